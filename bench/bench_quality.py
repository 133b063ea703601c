"""
Model-quality benchmark: the figures of issue 7, from the commands users run.

    python bench/bench_quality.py                      # full: 3 seeds per data set, ~1 h on 2 cores
    python bench/bench_quality.py --quick              # 1 seed, 3-minute training budget
    python bench/bench_quality.py --datasets ml-100k --seeds 1   # one data set, one seed
    python bench/bench_quality.py --smoke              # 200 users of ml-100k (bench/run --quick)

For each data set of ../shared/datasets (the SASRec authors' Video Games file, and
MovieLens 100K), with the defaults of ``rerankd train`` (nothing tuned per file):

1. ``rerankd train`` for seeds 0, 1, 2 (wall-clock seconds of each), then ``rerankd
   eval`` of each model under ``sampled-100`` and ``full``; mean and sample standard
   deviation over the seeds.
2. ``rerankd train --holdout 0.2`` (seed 0, at most 6 minutes), ``rerankd replay --online``: frozen
   vs live state (and live plus the online step), NDCG@10, HR@10 and the lifts.

``--smoke`` checks that all of it runs, not how good the model is: MovieLens 100K's
first 200 users only, one seed, L = 50, one model trained within 15 s (one epoch at
least) without the last 5% of each user's interactions (the replay holds out those: at
least one a user), which the evaluation and the replay share; and most of XLA's
optimisations off (``jax_disable_most_optimizations``: compiling takes half as long).

The commands run in-process through the same functions as the CLI (daemon.quality,
daemon.replay). Writes bench/out/quality.json (or under ``$RERANKD_BENCH_OUT``) and prints
a table with the verdicts. A data set it was asked for that is absent is an error (exit
status 1, after the others), named with the path it looked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from bench_daemon import judge, write_results  # noqa: E402

from daemon.online import OnlineLearner, OnlineOptions  # noqa: E402
from daemon.quality import TrainOptions, evaluate_model, load_dataset, train  # noqa: E402
from daemon.replay import replay  # noqa: E402

#: the shared data sets beside the checkout; ``$RERANKD_DATASETS`` names another directory
DATASETS = Path(os.environ.get("RERANKD_DATASETS") or ROOT.parent / "shared" / "datasets")
SOURCES = {
    "sasrec-video": (DATASETS / "sasrec-video.txt", "sasrec"),
    "ml-100k": (DATASETS / "ml-100k", "movielens"),
}
#: The SASRec paper's Games row (sampled-100), the figures to beat.
SASREC_GAMES = {"hr@10": 0.7410, "ndcg@10": 0.5360}
#: The replay's model (trained without the held-out part) gets a shorter budget.
REPLAY_MINUTES = 6.0
REPLAY_HOLDOUT = 0.2
#: --smoke: how many of ml-100k's users (ids 1..N), the sequence length, the budget
SMOKE_USERS, SMOKE_MAX_LEN, SMOKE_MINUTES, SMOKE_HOLDOUT = 200, 50, 0.25, 0.05
FIGURES = ("hr@10", "ndcg@10", "mrr", "coverage@10", "ild@10", "novelty@10")


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def smoke_copy(source: Path, tmp: Path, users: int) -> Path:
    """A MovieLens 100K directory in ``tmp`` with only the ratings of users 1..``users``."""
    out = tmp / "smoke" / source.name
    out.mkdir(parents=True)
    with (source / "u.data").open(encoding="latin-1") as lines:
        kept = [line for line in lines if line.strip() and int(line.split("\t", 1)[0]) <= users]
    (out / "u.data").write_text("".join(kept), encoding="latin-1")
    for name in ("u.item", "u.genre"):
        shutil.copyfile(source / name, out / name)
    return out


def run_dataset(name: str, seeds: list[int], options: TrainOptions, tmp: Path, *,
                smoke: bool = False) -> dict[str, Any]:  # fmt: skip
    path, fmt = SOURCES[name]
    if smoke:
        path = smoke_copy(path, tmp, SMOKE_USERS)
    data = load_dataset(path, fmt)  # type: ignore[arg-type]
    print(f"== {name}: {data.describe()}", flush=True)
    runs = []
    for seed in seeds:
        model = tmp / f"{name}-{seed}.safetensors"
        started = time.perf_counter()
        trained = train(data, model, dataclasses.replace(options, seed=seed))
        seconds = time.perf_counter() - started
        run: dict[str, Any] = {"seed": seed, "train_seconds": round(seconds, 1),
                               "epochs": trained.report["epochs"],
                               "best_epoch": trained.report["best_epoch"],
                               "time_bound": trained.report["time_bound"],
                               "members": trained.report["members"],
                               "config": trained.report["config"],
                               "loss": trained.report["loss"]}  # fmt: skip
        for protocol in ("sampled-100", "full"):
            summary, _ = evaluate_model(model, data, protocol=protocol, seed=seed)
            run[protocol] = {k: summary[k] for k in (*FIGURES, "users", "seconds")}
        print(f"   seed {seed}: {run['train_seconds']} s, {run['epochs']} epochs, "
              f"{run['members']} members, "
              f"sampled-100 HR@10 {run['sampled-100']['hr@10']:.4f} NDCG@10 "
              f"{run['sampled-100']['ndcg@10']:.4f}; full NDCG@10 {run['full']['ndcg@10']:.4f}",
              flush=True)  # fmt: skip
        runs.append(run)
    result: dict[str, Any] = {"data": data.describe(), "runs": runs}
    result["train_seconds"] = _spread([r["train_seconds"] for r in runs])
    for protocol in ("sampled-100", "full"):
        result[protocol] = {f: _spread([r[protocol][f] for r in runs]) for f in FIGURES}
    # the real-time experiment, on a model that never saw the held-out part (--smoke's
    # seed model was trained so already)
    model, holdout = tmp / f"{name}-{seeds[0]}.safetensors", options.holdout
    if holdout is None:
        model, holdout = tmp / f"{name}-replay.safetensors", REPLAY_HOLDOUT
        replay_model = train(data, model, dataclasses.replace(
            options, seed=0, holdout=holdout,
            max_minutes=min(options.max_minutes, REPLAY_MINUTES)))  # fmt: skip
        result["replay_model"] = {k: replay_model.report[k] for k in
                                  ("members", "epochs", "time_bound", "seconds")}  # fmt: skip
    learner = OnlineLearner(OnlineOptions(enabled=True))
    result["replay"] = replay(data, model, holdout=holdout, online=learner)
    r = result["replay"]
    print(f"   replay: frozen NDCG@10 {r['frozen']['ndcg@10']:.4f}, live {r['live']['ndcg@10']:.4f}"
          f" ({r['lift']['ndcg@10']:+.1%}), online {r['online']['ndcg@10']:.4f}"
          f" ({r['online_lift']['ndcg@10']:+.1%} over live); after a user's first held-out "
          f"interaction ({r['after_first']['held_out']}): frozen "
          f"{r['after_first']['frozen']['ndcg@10']:.4f}, live "
          f"{r['after_first']['live']['ndcg@10']:.4f} "
          f"({r['after_first']['lift']['ndcg@10']:+.1%})", flush=True)  # fmt: skip
    return result


def verdicts(results: dict[str, Any]) -> list[dict[str, str]]:
    checks: list[tuple[str, float, float, str]] = []
    video = results.get("sasrec-video")
    if video is not None:
        for f, bound in SASREC_GAMES.items():
            checks.append((f"sasrec-video sampled-100 {f} (mean of seeds) > SASRec's", round(
                video["sampled-100"][f]["mean"], 4), bound, "ge"))
        checks.append(("sasrec-video training seconds (slowest seed) <= 1200",
                       video["train_seconds"]["max"], 1200.0, "le"))  # fmt: skip
    for name, result in results.items():
        if isinstance(result, dict) and "replay" in result:
            lift = result["replay"]["lift"]["ndcg@10"]
            checks.append((f"{name} replay: live NDCG@10 lift over frozen >= 10%",
                           round(lift, 4), 0.10, "ge"))  # fmt: skip
    return judge(checks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3-minute training budget")
    parser.add_argument("--datasets", nargs="*", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 (default 3)")
    parser.add_argument("--smoke", action="store_true",
                        help=f"{SMOKE_USERS} users of ml-100k, L = {SMOKE_MAX_LEN}, "
                        f"{SMOKE_MINUTES * 60:.0f} s of training: checks that it runs")  # fmt: skip
    args = parser.parse_args()
    seeds = [0] if args.quick or args.smoke else list(range(args.seeds))
    options = TrainOptions(progress=False, max_minutes=3.0 if args.quick else 18.0)
    if args.smoke:
        import jax  # noqa: PLC0415 - the smoke run's compile setting only

        jax.config.update("jax_disable_most_optimizations", True)  # noqa: FBT003
        args.datasets = ["ml-100k"]
        options = TrainOptions(progress=False, max_len=SMOKE_MAX_LEN, max_minutes=SMOKE_MINUTES,
                               holdout=SMOKE_HOLDOUT)
    results: dict[str, Any] = {"options": dataclasses.asdict(options),
                               "sasrec_paper_games": SASREC_GAMES}
    absent = [name for name in args.datasets if not SOURCES[name][0].exists()]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            if name in absent:
                print(f"error: data set {name}: {SOURCES[name][0]} is absent", file=sys.stderr)
                continue
            results[name] = run_dataset(name, seeds, options, Path(tmp), smoke=args.smoke)
    if len(absent) < len(args.datasets):  # a run that measured nothing overwrites nothing
        results["targets"] = verdicts(results)
        write_results(results, "quality", quick=args.quick, smoke=args.smoke)
    if absent:
        msg = (f"bench_quality: no {', '.join(absent)} under {DATASETS} (put the shared data "
               "sets beside the checkout, or pass --datasets)")  # fmt: skip
        raise SystemExit(msg)


if __name__ == "__main__":
    main()
