"""
The model the daemon serves: which file, the checks that refuse an incompatible one, warm-up.

Every way a model comes in goes through `load_served_model`: the start, SIGHUP
(`daemon.service.Service.reload`) and the model trained in the background
(``Service._train``). It runs in a worker thread, never on the event loop, and before
anything is swapped: a refused model changes nothing, the model served before keeps
serving. A refusal is a `ModelRefusedError` whose ``reason`` names the rule:

- what `kernels.modelfile.load_model` refuses, under its own reason: ``missing``,
  ``corrupt`` (a truncated or damaged file), ``tensor_shape``, ``bad_manifest``, ...
  (`kernels.modelfile.Reason`);
- ``non_finite``: a parameter is NaN or infinite (a diverged training run): every
  score it touched would be NaN;
- ``disjoint_vocabulary``: the state knows at least `MIN_ITEMS_FOR_OVERLAP` items and
  the model's vocabulary contains none of them: a model trained on another catalogue.
  It would score none of the items the users interact with, and ids that happen to
  be equal across catalogues ("1", "2", ...) would get another item's embedding.
  Below that many items (a new daemon with a model trained elsewhere, say) nothing is
  concluded: a handful of new items may well be unknown to a good model. A partial
  overlap is accepted: items newer than the model are expected (they get cold-start
  vectors, `daemon._coldstart`).

Messages name the file, the rule and counts, never an item id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import structlog

from daemon._errors import DaemonError
from daemon.config import Config
from eventstore import State
from kernels.modelfile import LoadedModel, ModelFileError, load_model
from kernels.runtime import Ranker

__all__ = [
    "MIN_ITEMS_FOR_OVERLAP",
    "NO_MODEL",
    "TRAINED_MODEL",
    "ModelRefusedError",
    "ServedModel",
    "check_model",
    "feature_weights",
    "load_served_model",
    "model_path",
]

_log = structlog.get_logger("daemon.model")

#: Where a model trained from the log goes (under [store].data_dir): by the daemon on a
#: first start, and by ``rerankd train --log`` (systemd/rerankd-retrain.service).
TRAINED_MODEL: Final = "model.safetensors"
#: Items the state must know before a model that knows none of them is refused.
MIN_ITEMS_FOR_OVERLAP: Final = 20

_FIXES: Final = {
    "non_finite": "the training diverged; train again (a lower learning rate, say)",
    "disjoint_vocabulary": (
        "it was trained on another catalogue; train one on this daemon's log "
        "(`rerankd train --log`) or set [ranking].model_path to the right file"
    ),
}


class ModelRefusedError(DaemonError):
    """
    A model file that cannot be served.

    Args:
        path: the model file.
        reason: the rule it breaks (see the module docstring); log it as is.
        detail: what exactly is wrong and what to do, without item ids.
    """

    def __init__(self, path: Path, reason: str, detail: str) -> None:
        self.path = path
        self.reason = reason
        self.detail = detail
        super().__init__(f"model file {path} refused ({reason}): {detail}")


@dataclass(frozen=True, slots=True)
class ServedModel:
    """The model being served: its kernels, vocabulary, where it came from, warm-up time."""

    ranker: Ranker | None
    vocabulary: Sequence[str]
    source: str
    warmup_s: float
    created_at: str | None = None  # the model file's manifest: tells two files apart


NO_MODEL: Final = ServedModel(None, (), "none", 0.0)


def model_path(config: Config) -> Path | None:
    """
    The model file to serve: ``[ranking].model_path``, else the one trained from the log.

    The latter is ``<data_dir>/model.safetensors`` when it exists; None when neither is.
    """
    if config.ranking.model_path is not None:
        return config.ranking.model_path
    trained = config.store.data_dir / TRAINED_MODEL
    return trained if trained.exists() else None


def load_served_model(config: Config, state: State | None) -> ServedModel:
    """
    Load, check (`check_model`) and warm up the model to serve; `NO_MODEL` if none.

    Blocking (seconds: XLA compiles every bucket): call it from a worker thread.
    ``state`` is the state the model will serve (None: no overlap check).

    Raises:
        ModelRefusedError: the file cannot be served; the reason names the rule.
    """
    path = model_path(config)
    if path is None:
        return NO_MODEL
    try:
        loaded = load_model(path)
    except ModelFileError as e:
        detail = str(e).removeprefix(f"model file {e.path}: ")  # ours names the file too
        raise ModelRefusedError(path, e.reason, detail) from e
    check_model(loaded, path, state)
    ranker = Ranker(
        loaded.params, loaded.config, feature_weights=feature_weights(config),
        batch_buckets=config.ranking.batch_buckets,
        candidate_buckets=config.ranking.candidate_buckets,
    )  # fmt: skip
    # on a CPU the daemon scores with its own compiled loops (daemon.ranking): only the
    # encoders need compiling then
    report = ranker.warmup(scorers=not ranker.host_scores)
    _log.info("model_loaded", path=str(path), items=loaded.config.num_items,
              executables=report.executables, warmup_s=round(report.seconds, 2),
              device=report.device)  # fmt: skip
    return ServedModel(ranker, loaded.manifest.vocabulary, str(path), report.seconds,
                       loaded.manifest.created_at)  # fmt: skip


def check_model(loaded: LoadedModel, path: Path, state: State | None) -> None:
    """
    Refuse a loaded model the daemon must not serve (`ModelRefusedError`).

    The rules (``non_finite``, ``disjoint_vocabulary``) are the module docstring's.
    """
    for name, value in loaded.params.items():
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        if bad:
            detail = f"tensor {name!r} holds {bad} NaN or infinite values"
            raise ModelRefusedError(path, "non_finite", f"{detail}; {_FIXES['non_finite']}")
    if state is None or state.n_items < MIN_ITEMS_FOR_OVERLAP:
        return
    known = state.item_index
    if not any(item in known for item in loaded.manifest.vocabulary):
        detail = (
            f"none of the model's {loaded.manifest.vocab_size} items is among the "
            f"{state.n_items} items the state knows; {_FIXES['disjoint_vocabulary']}"
        )
        raise ModelRefusedError(path, "disjoint_vocabulary", detail)


def feature_weights(config: Config) -> tuple[float, float, float]:
    """The fusion weights of ``[ranking]``, in `daemon.ranking.FEATURES` order."""
    r = config.ranking
    return (r.popularity_weight, r.interest_weight, r.freshness_weight)
