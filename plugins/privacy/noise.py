"""
``noise``: calibrated Laplace noise on the per-item aggregates that leave the daemon.

The ``export`` op answers each item's impressions, clicks, interactions, decayed
popularity and click-through rate. With ``noise`` in ``[plugins].privacy`` each of
the four numbers of every item gets independent noise drawn from Laplace(0, b) with
scale b = ``sensitivity`` / ``epsilon`` (numpy's ``Generator.laplace``), the Laplace
mechanism. Then, as post-processing, which costs no privacy: a noised value below 0
becomes 0, the CTR is recomputed from the noised clicks and impressions and clipped to
[0, 1], and every value is rounded (counts and popularity to 3 decimals, kept as
floats; the CTR to 6). The answer says what was applied: ``"noise": {"mechanism":
"laplace", "epsilon": ε, "sensitivity": s}``.

What the guarantee is. Each released count is ε-differentially private with respect
to one user *only when one user can change that count by at most* ``sensitivity``. The
daemon does not bound a user's contribution: a user who clicked an item 50 times moved
its click count by 50, and with ``sensitivity = 1`` that user is protected only at
50ε. Set ``sensitivity`` to the most one user may add to one count in your data (or
bound contributions upstream). Popularity is a decayed count of interactions (each
adds 1, halving every half-life), so one user moves it by at most their number of
interactions with the item.

What it is not:

- **Per count, per export.** The four numbers of an item, and the items of a page,
  each spend ε: a user who touched k items (or moved impressions and clicks of one)
  is protected at up to the sum of those ε's.
- **Repeated exports compose.** Every export draws fresh noise, so averaging k
  exports of an unchanged state cancels it: k exports spend kε. Export rarely, or
  cache what you exported; the daemon keeps no privacy budget.
- **Operational counters are untouched.** ``stats`` (event totals, latencies, queue
  depths, the number of users and items) passes through unchanged: only an answer
  with an ``"items"`` list is noised. Those totals are not per item, but they are
  exact.
- **The item list is released as it is.** An item enters the state with its first
  event of any kind, so the presence of an item that only one user's events brought
  in (rather than an ``item`` event) reveals that user's interest. Feed the catalogue
  through ``item`` events, or drop rare items before publishing an export.

``seed`` makes the draws reproducible (tests); without it numpy's ``default_rng``
seeds from the operating system. A seeded plugin rebuilt by SIGHUP starts its
sequence again, and so repeats its noise: never set a seed in production.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Final

import numpy as np

from plugins.params import check_int, check_number

if TYPE_CHECKING:
    from eventstore.schema import Event

__all__ = ["NOISED", "Noise"]

_NAME: Final = "noise"
#: The item fields that get noise, in order.
NOISED: Final = ("impressions", "clicks", "interactions", "popularity")
_COUNT_DECIMALS: Final = 3
_CTR_DECIMALS: Final = 6
_MAX_SEED: Final = 2**63 - 1


class Noise:
    """
    Laplace noise on the per-item aggregates of ``export`` (see the module docstring).

    Args:
        epsilon: the privacy parameter ε of each noised number, > 0 (smaller: more noise).
        sensitivity: the most one user can change one number, > 0; the noise's scale is
            ``sensitivity / epsilon``.
        seed: seeds the random generator (reproducible tests); None draws the seed
            from the operating system.

    Raises:
        PluginError: a bad parameter, naming ``[plugins.noise].<key>``.

    .. versionadded:: 0.1.0
    """

    name: ClassVar[str] = _NAME

    def __init__(
        self, *, epsilon: float = 1.0, sensitivity: float = 1.0, seed: int | None = None
    ) -> None:
        self.epsilon = float(check_number(_NAME, "epsilon", epsilon, lo=0, lo_open=True))
        self.sensitivity = float(
            check_number(_NAME, "sensitivity", sensitivity, lo=0, lo_open=True)
        )
        if seed is not None:
            seed = check_int(_NAME, "seed", seed, lo=0, hi=_MAX_SEED)
        self.seed = seed
        #: The Laplace scale b of every draw.
        self.scale = self.sensitivity / self.epsilon
        self._rng = np.random.default_rng(seed)
        # a Generator is not thread-safe: exports run on the kernel thread, but a plugin
        # may be called from elsewhere (tests, another op)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Noise(epsilon={self.epsilon:g}, sensitivity={self.sensitivity:g})"

    def ingest(self, events: Sequence[Event]) -> list[Event]:
        """Events are stored as they are: noise applies to what leaves, not what is kept."""
        return list(events)

    def user_id(self, user: str) -> str:
        """User ids are ``pseudonymize``'s business: unchanged."""
        return user

    def export(self, aggregates: Mapping[str, Any]) -> dict[str, Any]:
        """
        ``aggregates`` with Laplace noise on each item's counts and popularity.

        Only an answer with an ``"items"`` list (``export``) is changed: its items'
        `NOISED` fields get noise, are clamped at 0 and rounded, and ``ctr`` is
        recomputed from the noised clicks and impressions; ``"noise"`` says what was
        applied. Anything else (``stats``' operational counters) is returned unchanged.
        """
        out = dict(aggregates)
        items = out.get("items")
        if not isinstance(items, list):
            return out
        out["items"] = self.noised(items)
        out["noise"] = {"mechanism": "laplace", "epsilon": self.epsilon,
                        "sensitivity": self.sensitivity}  # fmt: skip
        return out

    def noised(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """
        New item dicts: `NOISED` fields noised and post-processed, ``ctr`` recomputed.

        ``[N, 4]`` exact values plus ``[N, 4]`` independent Laplace(0, scale) draws,
        clamped at 0 and rounded; ``ctr = min(clicks / impressions, 1)`` of the
        rounded noised values (0 when impressions round to 0).
        """
        exact = np.array([[float(item[k]) for k in NOISED] for item in items], np.float64)
        exact = exact.reshape(len(items), len(NOISED))
        with self._lock:
            draws = self._rng.laplace(0.0, self.scale, size=exact.shape)
        values = np.round(np.maximum(exact + draws, 0.0), _COUNT_DECIMALS)
        shown, clicked = values[:, 0], values[:, 1]
        ctr = np.divide(clicked, shown, out=np.zeros(len(items)), where=shown > 0)
        ctr = np.round(np.clip(ctr, 0.0, 1.0), _CTR_DECIMALS)
        return [
            {**item, **dict(zip(NOISED, row, strict=True)), "ctr": rate}
            for item, row, rate in zip(items, values.tolist(), ctr.tolist(), strict=True)
        ]
