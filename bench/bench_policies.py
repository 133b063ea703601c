"""
Policy benchmark: what MMR diversification costs in accuracy and buys in diversity.

    python bench/bench_policies.py            # full run, about 6 minutes on 2 cores
    python bench/bench_policies.py --quick    # smaller models, fewer users: under 2 minutes

For each data set of ../shared/datasets (MovieLens 100K, with genres; the SASRec
authors' Amazon Video Games file, without categories):

1. Leave-one-out, the SASRec protocol: each user's last item is the test item, the one
   before it the validation item, the rest training. A SASRec encoder is trained with
   the repository's own :func:`kernels.train.fit` (early stopping on validation
   NDCG@10, as ``daemon/autotrain.py`` does).
2. For each test user, the model ranks the whole catalogue minus every item the user
   interacted with (train and validation items; the test item stays rankable), and its
   top 100 are the candidate list.
3. :class:`plugins.policies.mmr.MmrPolicy` re-ranks the candidates for each λ, called
   as the daemon calls it: a :class:`plugins.base.PolicyInput` with the model's scores,
   ``k = 10`` and the model's item embeddings as ``embeddings``. λ = 1 is the model's
   own order.
4. Per λ: NDCG@10 and HR@10 of the test item in the re-ranked top 10, and ILD@10
   (:func:`kernels.metrics.intra_list_diversity`) under 1 - cosine of the model's item
   embeddings and, where the data set has genres, 1 - Jaccard of the genre sets; each
   also as a relative change against λ = 1.

Embedding ILD is measured in the space MMR itself diversifies, so it rises by
construction; genre ILD is the independent check. Everything is seeded: the same
machine gives the same figures. Writes bench/out/policies.json and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_daemon import judge, write_results  # noqa: E402

from eventstore import State  # noqa: E402
from eventstore.importers import movielens_events, sasrec_events  # noqa: E402
from eventstore.schema import Interaction, ItemUpdated, Rated  # noqa: E402
from kernels.metrics import (  # noqa: E402
    cosine_distances,
    hit_rate_metric,
    intra_list_diversity,
    jaccard_distances,
    ndcg_metric,
)
from kernels.sasrec import SasrecConfig, encode_users, init_params, item_logits  # noqa: E402
from kernels.train import LossName, TrainReport, default_optimizer, fit  # noqa: E402
from plugins.base import PolicyInput  # noqa: E402
from plugins.policies.mmr import MmrPolicy  # noqa: E402

DATASETS = ROOT.parent / "shared" / "datasets"
LAMBDAS = (1.0, 0.9, 0.7, 0.5, 0.3)
K = 10
N_CANDIDATES = 100
#: The λ of the issue's targets, and the NDCG@10 share it may lose (the stated cost,
#: as in tests/plugins/test_mmr_quality.py).
HALF = 0.5
MAX_NDCG_LOSS = 0.15
#: users per jitted candidate call (the last block is padded, so it compiles once)
_USER_BLOCK = 256


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True, slots=True)
class Dataset:
    """
    Interaction sequences in model indices, and optional item categories.

    ``vocabulary[i]`` is the item id of model index ``i + 1``; ``sequences`` hold one
    int32 array per user, oldest first; ``genres`` is bool ``[num_items + 1, G]``
    (row 0, padding, all False) or None.
    """

    name: str
    vocabulary: tuple[str, ...]
    sequences: list[np.ndarray]
    genres: np.ndarray | None

    @property
    def num_items(self) -> int:
        return len(self.vocabulary)


def _sequences(pairs: Iterator[tuple[str, str]], index: dict[str, int]) -> list[np.ndarray]:
    """Per user (in order of first appearance), the model indices of ``(user, item)``."""
    users: dict[str, list[int]] = {}
    for user, item in pairs:
        users.setdefault(user, []).append(index[item])
    return [np.asarray(items, np.int32) for items in users.values()]


def load_movielens(path: Path) -> Dataset:
    """MovieLens through the repository's importer: ratings in time order, genres as tags."""
    events, _ = movielens_events(path)
    items = [e for e in events if isinstance(e, ItemUpdated)]
    vocabulary = tuple(e.item for e in items)
    index = {item: i + 1 for i, item in enumerate(vocabulary)}
    tags = [_tags(e) for e in items]
    names = sorted({t for ts in tags for t in ts})
    genres = np.zeros((len(items) + 1, len(names)), bool)
    for i, ts in enumerate(tags, start=1):
        genres[i, [names.index(t) for t in ts]] = True
    ratings = ((e.user, e.item) for e in events if isinstance(e, Rated))
    return Dataset(path.name, vocabulary, _sequences(ratings, index), genres)


def _tags(event: ItemUpdated) -> list[str]:
    """The item's ``tags`` field (the importer puts the genres there), or none."""
    value = event.fields.get("tags")
    return [str(t) for t in value] if isinstance(value, list) else []


def load_sasrec(path: Path) -> Dataset:
    """A SASRec-format file through the repository's importer; items by first appearance."""
    pairs = [(e.user, e.item) for e in sasrec_events(path) if isinstance(e, Interaction)]
    index: dict[str, int] = {}
    for _, item in pairs:
        index.setdefault(item, len(index) + 1)
    return Dataset(path.stem, tuple(index), _sequences(iter(pairs), index), None)


@dataclasses.dataclass(frozen=True, slots=True)
class Split:
    """
    Leave-one-out arrays in ``fit``'s layout (users with at least three items).

    ``train_*`` ``[U, L]``: inputs and next items of each user's training part;
    ``val_*``: the training part ``[U, L]`` and the validation item ``[U]``;
    ``test_*``: training part plus validation item ``[U, L]`` and the test item ``[U]``;
    ``seen``: each user's items before the test item, whatever ``L`` keeps.
    """

    train_inputs: np.ndarray
    train_targets: np.ndarray
    val_inputs: np.ndarray
    val_targets: np.ndarray
    test_inputs: np.ndarray
    test_targets: np.ndarray
    seen: list[np.ndarray]


def _left_padded(rows: Sequence[np.ndarray], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
        tail = row[-length:]
        out[r, length - len(tail) :] = tail
    return out


def leave_one_out(sequences: Sequence[np.ndarray], max_len: int) -> Split:
    """The SASRec split: last item test, second-last validation, the rest training."""
    kept = [s for s in sequences if len(s) >= 3]
    train = [s[:-2] for s in kept]
    return Split(
        train_inputs=_left_padded([t[:-1] for t in train], max_len),
        train_targets=_left_padded([t[1:] for t in train], max_len),
        val_inputs=_left_padded(train, max_len),
        val_targets=np.asarray([s[-2] for s in kept], np.int32),
        test_inputs=_left_padded([s[:-1] for s in kept], max_len),
        test_targets=np.asarray([s[-1] for s in kept], np.int32),
        seen=[s[:-1] for s in kept],
    )


# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True, slots=True)
class TrainSettings:
    """The model and ``fit`` options for one data set."""

    max_len: int
    dim: int
    num_blocks: int
    epochs: int
    batch_size: int
    learning_rate: float
    loss: LossName = "full"
    num_negatives: int = 256
    patience: int = 3
    dropout: float = 0.2
    #: validation users per epoch (a seeded random subset when there are more)
    max_val_users: int = 5_000


def train_model(
    data: Dataset, split: Split, settings: TrainSettings, *, seed: int, progress: bool = False
) -> tuple[dict[str, jax.Array], SasrecConfig, TrainReport]:
    """A SASRec encoder trained with :func:`kernels.train.fit` (best validation epoch)."""
    config = SasrecConfig(
        num_items=data.num_items,
        max_len=settings.max_len,
        dim=settings.dim,
        num_blocks=settings.num_blocks,
        num_heads=1,
        dropout=settings.dropout,
    )
    params = jax.jit(init_params, static_argnums=1)(jax.random.key(seed), config)
    users = np.random.default_rng(seed).permutation(len(split.val_targets))
    val = np.sort(users[: settings.max_val_users])
    params, report = fit(
        params,
        config,
        split.train_inputs,
        split.train_targets,
        val_inputs=split.val_inputs[val],
        val_targets=split.val_targets[val],
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        seed=seed,
        loss=settings.loss,
        num_negatives=settings.num_negatives,
        optimizer=default_optimizer(settings.learning_rate),
        patience=settings.patience,
        progress=progress,
    )
    return params, config, report


# ----------------------------------------------------------------------------- candidates


@functools.partial(jax.jit, static_argnames=("config", "n"))
def _top_candidates(
    params: dict[str, jax.Array],
    inputs: jax.Array,
    targets: jax.Array,
    excluded: jax.Array,
    *,
    config: SasrecConfig,
    n: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(top-``n`` scores, their items, full-ranking NDCG@10) for ``[B]`` users."""
    scores = item_logits(params, encode_users(params, inputs, config=config))
    ndcg = ndcg_metric(scores, targets, k=K, where=~excluded)
    top_scores, top_items = jax.lax.top_k(jnp.where(excluded, -jnp.inf, scores), n)
    return top_scores, top_items, ndcg


def _excluded(seen: Sequence[np.ndarray], targets: np.ndarray, num_cols: int) -> np.ndarray:
    """bool ``[B, num_cols]``: padding and each user's seen items, never the target."""
    mask = np.zeros((len(targets), num_cols), bool)
    rows = np.repeat(np.arange(len(seen)), [len(s) for s in seen])
    mask[rows, np.concatenate(seen)] = True
    mask[:, 0] = True
    mask[np.arange(len(targets)), targets] = False
    return mask


def candidates(
    params: dict[str, jax.Array], config: SasrecConfig, split: Split, users: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    Each user's top ``N_CANDIDATES`` of the catalogue minus what they interacted with.

    Returns:
        ``(scores [U, 100] float32, items [U, 100] int, full_ndcg [U])``, best first;
        ``full_ndcg`` is NDCG@10 of the test item over the whole catalogue.
    """
    out = []
    for start in range(0, len(users), _USER_BLOCK):
        block = users[start : start + _USER_BLOCK]
        pad = _USER_BLOCK - len(block)
        inputs = np.pad(split.test_inputs[block], ((0, pad), (0, 0)))
        targets = np.pad(split.test_targets[block], (0, pad))
        seen = [split.seen[u] for u in block] + [np.zeros(0, np.int32)] * pad
        excluded = _excluded(seen, targets, config.num_items + 1)
        parts = _top_candidates(params, inputs, targets, excluded, config=config, n=N_CANDIDATES)
        out.append([np.asarray(p)[: len(block)] for p in parts])
    return tuple(np.concatenate(p) for p in zip(*out, strict=True))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- re-ranking


def rerank(
    policy: MmrPolicy,
    scores: np.ndarray,
    items: np.ndarray,
    *,
    item_table: np.ndarray,
    vocabulary: np.ndarray,
) -> np.ndarray:
    """
    The policy's top ``K`` model indices ``[U, K]``, one ``apply`` per user.

    The request is built as ``daemon/ranking.py`` builds it: items best first by the
    model, their scores, and the model's item embeddings in the same order; rows are
    -1 (the policy reads no state) and the request's ``k`` is ``K``.
    """
    state, rows = State(), np.full(items.shape[1], -1, np.int64)
    top = np.zeros((len(items), K), np.int64)
    for u in range(len(items)):
        request = PolicyInput(
            user=str(u), user_row=-1, items=vocabulary[items[u]].tolist(),
            scores=scores[u], rows=rows, state=state, k=K, embeddings=item_table[items[u]],
        )  # fmt: skip
        top[u] = items[u, policy.apply(request).order[:K]]
    return top


def quality(
    top: np.ndarray, targets: np.ndarray, *, item_table: np.ndarray, genres: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Per-user NDCG@10, HR@10 and ILD@10 (embedding; genre when known) of ``top [U, K]``."""
    hit = top == targets[:, None]
    position = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)  # -1: not in the top K
    by_position = np.broadcast_to(-np.arange(K, dtype=np.float32), top.shape)
    out = {
        "ndcg_at_10": ndcg_metric(by_position, position, k=K),
        "hr_at_10": hit_rate_metric(by_position, position, k=K),
        "ild_at_10_embedding": intra_list_diversity(
            item_table[top], k=K, distance_fn=cosine_distances
        ),
    }
    if genres is not None:
        out["ild_at_10_genre"] = intra_list_diversity(
            genres[top], k=K, distance_fn=jaccard_distances
        )
    return {name: np.asarray(values, np.float64) for name, values in out.items()}


def compare(per_lambda: dict[float, dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    """
    Means per λ, each with its relative change against λ = 1 (paired: the same users).

    ``<metric>_delta_se`` is the standard error of the mean per-user difference from
    λ = 1: a change several times larger is not noise of the user sample.
    """
    base = per_lambda[1.0]
    rows = []
    for lam, values in per_lambda.items():
        row: dict[str, Any] = {"lambda": lam}
        for name, v in values.items():
            mean, ref = float(v.mean()), float(base[name].mean())
            diff = v - base[name]
            row[name] = round(mean, 5)
            row[f"{name}_change"] = round(mean / ref - 1, 5) if ref else None
            row[f"{name}_delta_se"] = round(float(diff.std(ddof=1) / math.sqrt(len(diff))), 5)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- one data set


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the block under ``name``, and print it."""
    started = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - started, 2)
    print(f"  {name}: {timings[name]:.1f} s", flush=True)


def evaluate(
    data: Dataset,
    settings: TrainSettings,
    *,
    lambdas: Sequence[float] = LAMBDAS,
    max_test_users: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """
    Train, build candidates, re-rank for each λ: the figures of :func:`compare`.

    ``lambdas`` must include 1.0 (the reference); ``max_test_users`` evaluates a
    seeded random subset of the test users (all by default).
    """
    timings: dict[str, float] = {}
    split = leave_one_out(data.sequences, settings.max_len)
    with _timed(timings, "train_s"):
        params, config, report = train_model(data, split, settings, seed=seed, progress=progress)
    best = report.epochs[report.best_epoch - 1]
    print(f"  {len(report.epochs)} epochs, best {best.epoch}: validation NDCG@10 "
          f"{best.val_ndcg_at_10:.4f}, HR@10 {best.val_hr_at_10:.4f}")  # fmt: skip
    users = np.arange(len(split.test_targets))
    if max_test_users is not None and max_test_users < len(users):
        users = np.sort(np.random.default_rng(seed + 1).permutation(users)[:max_test_users])
    with _timed(timings, "candidates_s"):
        scores, items, full_ndcg = candidates(params, config, split, users)
    item_table = np.asarray(params["item_emb"], np.float32)
    vocabulary = np.asarray(("<padding>", *data.vocabulary), dtype=object)
    targets = split.test_targets[users]
    per_lambda = {}
    for lam in lambdas:
        policy = MmrPolicy(lambda_=lam)
        with _timed(timings, f"rerank_lambda_{lam}_s"):
            top = rerank(policy, scores, items, item_table=item_table, vocabulary=vocabulary)
        per_lambda[lam] = quality(top, targets, item_table=item_table, genres=data.genres)
    return {
        "users": len(split.test_targets),
        "test_users": len(users),
        "items": data.num_items,
        "settings": dataclasses.asdict(settings),
        "training": report.to_dict(),
        "full_ranking_ndcg_at_10": round(float(full_ndcg.mean()), 5),
        "lambdas": compare(per_lambda),
        "timings": timings,
    }


# ----------------------------------------------------------------------------- main


#: MovieLens 100K: 943 users with 20 to 737 ratings; L = 100 keeps most histories whole.
ML_SETTINGS = TrainSettings(
    max_len=100, dim=64, num_blocks=2, epochs=60, batch_size=64, learning_rate=2e-3, patience=5
)
#: The settings of tests/plugins/test_mmr_quality.py: about 20 s of training.
ML_QUICK_SETTINGS = TrainSettings(
    max_len=50, dim=32, num_blocks=1, epochs=16, batch_size=64, learning_rate=5e-3
)
#: Video Games: 31,013 users, 90% with 15 items or fewer, so L = 20 (not the paper's 50)
#: loses little and trains 2.5 times faster; 23,715 items, so a sampled softmax over
#: 1,024 shared negatives instead of the full one. About 20 s per epoch on two cores.
VIDEO_SETTINGS = TrainSettings(
    max_len=20, dim=64, num_blocks=2, epochs=12, batch_size=256, learning_rate=3e-3,
    loss="sampled", num_negatives=1024, patience=2, max_val_users=2_000,
)  # fmt: skip
VIDEO_QUICK_SETTINGS = dataclasses.replace(VIDEO_SETTINGS, epochs=3)


def _datasets(quick: bool) -> list[tuple[str, Callable[[], Dataset], TrainSettings, int | None]]:  # noqa: FBT001
    """(name, loader, settings, test-user cap) per data set; quick runs are smaller."""
    return [
        ("ml-100k", lambda: load_movielens(DATASETS / "ml-100k"),
         ML_QUICK_SETTINGS if quick else ML_SETTINGS, None),
        ("sasrec-video", lambda: load_sasrec(DATASETS / "sasrec-video.txt"),
         VIDEO_QUICK_SETTINGS if quick else VIDEO_SETTINGS, 2_000 if quick else None),
    ]  # fmt: skip


_COLUMNS = {
    "ndcg_at_10": "NDCG@10",
    "hr_at_10": "HR@10",
    "ild_at_10_embedding": "ILD@10 embedding",
    "ild_at_10_genre": "ILD@10 genre",
}


def print_table(name: str, result: dict[str, Any]) -> None:
    """One line per λ: each mean and its relative change against λ = 1."""
    print(f"\n{name}: {result['test_users']} test users, {result['items']} items, "
          f"full-ranking NDCG@10 of the model {result['full_ranking_ndcg_at_10']:.4f}")  # fmt: skip
    columns = [c for c in _COLUMNS if c in result["lambdas"][0]]
    print("  λ   " + "".join(f"{_COLUMNS[c]:>22}" for c in columns))
    for row in result["lambdas"]:
        cells = "".join(f"{row[c]:>12.4f} ({row[c + '_change']:+6.1%})" for c in columns)
        print(f"  {row['lambda']:<4}{cells}")


def verdicts(results: dict[str, Any]) -> list[tuple[str, float, float, str]]:
    """
    Issue 6 at λ = 0.5: each ILD@10 rises, NDCG@10 loses at most ``MAX_NDCG_LOSS``.

    The figures are relative changes against λ = 1 (0.05 = +5%).
    """
    checks = []
    for name, r in results["datasets"].items():
        half = next(row for row in r["lambdas"] if row["lambda"] == HALF)
        for metric, label in (("ild_at_10_genre", "genre"), ("ild_at_10_embedding", "embedding")):
            if metric in half:
                checks.append((f"{name}: {label} ILD@10 rises at λ = {HALF}",
                               half[f"{metric}_change"], 0.0, "ge"))  # fmt: skip
        checks.append((f"{name}: NDCG@10 loses <= {MAX_NDCG_LOSS:.0%} at λ = {HALF}",
                       half["ndcg_at_10_change"], -MAX_NDCG_LOSS, "ge"))  # fmt: skip
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="fewer users and epochs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, Any] = {"lambdas": list(LAMBDAS), "k": K, "candidates": N_CANDIDATES,
                               "datasets": {}}  # fmt: skip
    for name, load, settings, cap in _datasets(args.quick):
        print(f"{name}:", flush=True)
        timings: dict[str, float] = {}
        with _timed(timings, "load_s"):
            data = load()
        result = evaluate(data, settings, max_test_users=cap, seed=args.seed,
                          progress=sys.stderr.isatty())  # fmt: skip
        result["timings"] = timings | result["timings"]
        result["timings"]["total_s"] = round(sum(result["timings"].values()), 2)
        results["datasets"][name] = result
    for name, result in results["datasets"].items():
        print_table(name, result)
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(f"\nelapsed: {results['elapsed_s']:.0f} s")
    results["targets"] = judge(verdicts(results))
    results["cpu_model"] = _cpu_model()
    write_results(results, "policies", quick=args.quick)


def _cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (write_results records only the arch)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    main()
