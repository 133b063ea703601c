"""Configuration of the fold: sequence length, decay, event-type weights, table sizes."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

import msgspec

from eventstore.schema import INTERACTION_TYPES

__all__ = ["DEFAULT_WEIGHTS", "FoldConfig"]

#: How much one event of each type says about the user's interest. Negative types
#: (dislike, skip) push interest down. A rating weighs ``weights["rating"] *
#: (value - rating_neutral)``, so a 1-star rating counts against the item's category.
DEFAULT_WEIGHTS: Final[Mapping[str, float]] = MappingProxyType({
    "view": 1.0, "click": 2.0, "cart": 3.0, "purchase": 5.0, "rating": 1.0,
    "like": 3.0, "dislike": -3.0, "skip": -1.0,
})


@dataclass(frozen=True, slots=True, kw_only=True)
class FoldConfig:
    """
    Everything the fold's result depends on besides the events.

    A snapshot records the fingerprint of the config that built it; a snapshot made
    under another config is not used (the state is rebuilt from the log instead).

    Args:
        seq_len: L, how many recent items each user keeps (the model's sequence length).
        half_life_s: half-life of decayed interest and popularity, in seconds.
        weights: interest weight per interaction type.
        rating_neutral: the rating that says nothing (weights are relative to it).
        categories_per_user: K, category-interest slots per user.
        purchases_per_user: P, how many recent purchases are remembered exactly.
    """

    seq_len: int = 50
    half_life_s: float = 7 * 86_400.0
    weights: Mapping[str, float] = field(default_factory=lambda: DEFAULT_WEIGHTS)
    rating_neutral: float = 2.5
    categories_per_user: int = 8
    purchases_per_user: int = 16

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.seq_len <= 4096:
            problems.append(f"seq_len: expected 1..4096, got {self.seq_len}")
        if not (math.isfinite(self.half_life_s) and self.half_life_s > 0):
            problems.append(f"half_life_s: expected a finite number > 0, got {self.half_life_s}")
        unknown = sorted(set(self.weights) - set(INTERACTION_TYPES))
        if unknown:
            problems.append(f"weights: unknown event types {unknown}; "
                            f"known: {', '.join(INTERACTION_TYPES)}")
        if not all(math.isfinite(float(w)) for w in self.weights.values()):
            problems.append("weights: expected finite numbers")
        if not 1 <= self.categories_per_user <= 255:
            problems.append("categories_per_user: expected 1..255")
        if not 1 <= self.purchases_per_user <= 255:
            problems.append("purchases_per_user: expected 1..255")
        if problems:
            raise ValueError("; ".join(problems))
        merged = {**DEFAULT_WEIGHTS, **{k: float(v) for k, v in self.weights.items()}}
        object.__setattr__(self, "weights", MappingProxyType(merged))

    def as_dict(self) -> dict[str, object]:
        """Plain values, for snapshot headers and reports."""
        return {
            "seq_len": self.seq_len, "half_life_s": self.half_life_s,
            "weights": dict(sorted(self.weights.items())),
            "rating_neutral": self.rating_neutral,
            "categories_per_user": self.categories_per_user,
            "purchases_per_user": self.purchases_per_user,
        }

    def fingerprint(self) -> str:
        """A short stable hash of :meth:`as_dict`."""
        blob = msgspec.json.encode(self.as_dict(), order="sorted")
        return hashlib.sha256(blob).hexdigest()[:16]
