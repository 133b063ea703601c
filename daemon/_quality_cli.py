"""
``rerankd train``, ``rerankd eval`` and ``rerankd replay``: the model-quality commands.

Their interface is meant to be scripted against (issue 7): options and JSON keys are
stable. The work is in :mod:`daemon.quality` and :mod:`daemon.replay`; JAX is
imported only when a command runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from daemon._cli_socket import CliError
from daemon.online import OnlineOptions

#: the [online] defaults, which `replay --online` measures unless told otherwise
ONLINE_DEFAULTS = OnlineOptions()

__all__ = ["eval_command", "replay_command", "train_command"]

_FORMATS = click.Choice(["sasrec", "movielens"])
_dataset = click.option(
    "--dataset", "dataset", type=click.Path(exists=True, path_type=Path),
    help="A data set: a SASRec 'user item' file, or a MovieLens directory or ratings file.",
)  # fmt: skip
_format = click.option("--format", "fmt", type=_FORMATS, help="The data set's format.")
_json = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
_seed = click.option(
    "--seed", default=0, show_default=True, type=click.IntRange(min=0),
    help="Seeds everything random: the same seed gives the same result.",
)  # fmt: skip


def _load(dataset: Path | None, fmt: str | None) -> Any:
    from daemon.quality import load_dataset  # noqa: PLC0415

    if dataset is None:
        raise CliError("--dataset: required (a data set file or directory)")
    if fmt is None:
        raise CliError("--format: required with --dataset (sasrec or movielens)")
    try:
        return load_dataset(dataset, fmt)  # type: ignore[arg-type]
    except (ValueError, OSError) as e:
        raise CliError(str(e)) from e


@click.command("train")
@_dataset
@_format
@click.option("--log", "from_log", is_flag=True,
              help="Train on the daemon's own event log ([store].data_dir of --config).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="RERANKD_CONFIG", help="TOML config, for --log (default: ./var/).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The model file to write (atomically).")
@_seed
@click.option("--max-len", type=click.IntRange(min=1),
              help="Sequence length L (default: from the data).")
@click.option("--dim", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--members", default=3, show_default=True, type=click.IntRange(min=1),
              help="Ensemble size: encoders trained side by side, scores averaged; fewer "
                   "are kept when the time budget cannot fit them.")
@click.option("--dropout", type=click.FloatRange(0.0, 0.95), help="Default: from the data.")
@click.option("--loss", type=click.Choice(["full", "sampled", "bce"]),
              help="Default: from the catalogue size.")
@click.option("--negatives", default=256, show_default=True, type=click.IntRange(min=1),
              help="Uniform negatives per step for the sampled softmax.")
@click.option("--epochs", "max_epochs", default=200, show_default=True, type=click.IntRange(min=1),
              help="At most this many epochs (early stopping on validation NDCG@10).")
@click.option("--patience", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--max-minutes", default=18.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Time budget: no epoch starts that would end after it.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Leave out each user's last share of interactions (at least one), as "
                   "`rerankd replay --holdout` does: a model for the replay.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_json
def train_command(
    *, dataset: Path | None, fmt: str | None, from_log: bool, config_path: Path | None,
    out: Path, seed: int, max_len: int | None, dim: int, members: int, dropout: float | None,
    loss: str | None, negatives: int, max_epochs: int, patience: int, max_minutes: float,
    holdout: float | None, quiet: bool, as_json: bool,
) -> None:  # fmt: skip
    """
    Train the sequential ranker and write a model file and a training report.

    Leave-one-out: each user's last item is held out (the test item of `rerankd
    eval`), the one before it validates (early stopping on NDCG@10), the rest trains.
    Writes MODEL, MODEL.train.json and MODEL.train.png.
    """
    from daemon.quality import TrainOptions, load_log, train  # noqa: PLC0415

    if from_log == (dataset is not None):
        raise CliError("give either --dataset FILE --format FMT or --log")
    if from_log:
        from daemon.config import load_config  # noqa: PLC0415
        from eventstore.store import LOG_FILE  # noqa: PLC0415

        path = load_config(config_path).store.data_dir / LOG_FILE
        try:
            data = load_log(path)
        except (ValueError, OSError) as e:
            raise CliError(str(e)) from e
    else:
        data = _load(dataset, fmt)
    options = TrainOptions(
        seed=seed, max_len=max_len, dim=dim, members=members, dropout=dropout,
        loss=loss,  # type: ignore[arg-type]
        negatives=negatives,
        max_epochs=max_epochs, patience=patience, max_minutes=max_minutes, progress=not quiet,
        holdout=holdout,
    )  # fmt: skip
    try:
        result = train(data, out, options)
    except ValueError as e:
        raise CliError(str(e)) from e
    report = {k: v for k, v in result.report.items() if k not in {"history", "options"}}
    if as_json:
        click.echo(json.dumps(report))
        return
    from daemon.quality import table  # noqa: PLC0415

    click.echo(table((k, v) for k, v in report.items() if k != "config"))
    click.echo(f"model: {out}\nreport: {out}.train.json, {out}.train.png")


@click.command("eval")
@click.option("--model", "model_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_dataset
@_format
@click.option("--protocol", type=click.Choice(["sampled-100", "full"]), default="sampled-100",
              show_default=True)
@click.option("--max-users", type=click.IntRange(min=1),
              help="Evaluate a random subset of this many users (default: all).")
@_seed
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The markdown report (default: MODEL.eval-PROTOCOL.md; not with --json).")
@_json
def eval_command(
    *, model_path: Path, dataset: Path | None, fmt: str | None, protocol: str,
    max_users: int | None, seed: int, report_path: Path | None, as_json: bool,
) -> None:  # fmt: skip
    """
    Evaluate a model on a data set, leave-one-out, under sampled-100 or full ranking.

    sampled-100 ranks each user's last item against 100 items drawn uniformly from
    those the user never interacted with (the SASRec paper's protocol); full ranks it
    against every item the user has not interacted with.
    """
    from daemon.quality import evaluate_model, table, write_eval_report  # noqa: PLC0415
    from kernels.modelfile import ModelFileError  # noqa: PLC0415

    data = _load(dataset, fmt)
    try:
        summary, result = evaluate_model(model_path, data, protocol=protocol, seed=seed,
                                         max_users=max_users)  # fmt: skip
    except (ModelFileError, ValueError) as e:
        raise CliError(str(e)) from e
    if as_json:
        click.echo(json.dumps(summary))
        return
    click.echo(table(summary.items()))
    path = report_path or model_path.with_name(f"{model_path.name}.eval-{protocol}.md")
    write_eval_report(summary, result, path)
    click.echo(f"report: {path}")


@click.command("replay")
@_dataset
@_format
@click.option("--model", "model_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--holdout", default=0.2, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="The share of each user's last interactions that is held out (at least one).")
@click.option("--negatives", default=100, show_default=True, type=click.IntRange(min=1),
              help="Sampled negatives ranked with each held-out item.")
@click.option("--online/--no-online", default=False, show_default=True,
              help="Also measure the online learning step on top of live state.")
@click.option("--embedding-learning-rate", default=ONLINE_DEFAULTS.embedding_learning_rate,
              show_default=True,
              type=click.FloatRange(min=0),
              help="With --online: the rate the step moves the item embeddings at "
              "([online].embedding_learning_rate; 0: biases only).")
@_seed
@_json
def replay_command(
    *, dataset: Path | None, fmt: str | None, model_path: Path, holdout: float,
    negatives: int, online: bool, embedding_learning_rate: float, seed: int, as_json: bool,
) -> None:  # fmt: skip
    """
    Frozen vs live state: rank each held-out interaction with each; report the lift.

    Frozen is the state at the cut-off, live the state folded up to the moment before
    the interaction; the report gives NDCG@10 and HR@10 for each, and the lift.
    """
    from daemon.replay import replay  # noqa: PLC0415
    from kernels.modelfile import ModelFileError  # noqa: PLC0415

    data = _load(dataset, fmt)
    learner = None
    if online:
        from daemon.online import OnlineLearner  # noqa: PLC0415

        options = OnlineOptions(enabled=True, seed=seed,
                                embedding_learning_rate=embedding_learning_rate)  # fmt: skip
        learner = OnlineLearner(options)
    try:
        report = replay(data, model_path, holdout=holdout, negatives=negatives, seed=seed,
                        online=learner)  # fmt: skip
    except (ModelFileError, ValueError) as e:
        raise CliError(str(e)) from e
    if as_json:
        click.echo(json.dumps(report))
        return
    rows: list[tuple[str, object]] = []
    for mode in ("frozen", "live", "online"):
        if mode in report:
            rows += [(f"{mode} {m}", report[mode][m]) for m in ("ndcg@10", "hr@10")]
    for name in ("lift", "online_lift"):
        if name in report:
            rows += [(f"{name} {m}", _percent(v)) for m, v in report[name].items()]
    after = report["after_first"]
    rows += [(f"after a user's first: lift {m}", _percent(v)) for m, v in after["lift"].items()]
    rows += [("after a user's first: held_out", after["held_out"])]
    rows += [(k, report[k]) for k in ("held_out", "skipped", "users", "seconds")]
    from daemon.quality import table  # noqa: PLC0415

    click.echo(table(rows))
    sys.stdout.flush()


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:+.1f}%"
