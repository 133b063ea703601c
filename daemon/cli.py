"""
The ``rerankd`` command line.

Errors become one line on stderr and a non-zero exit (``click.ClickException``);
logs are JSON on stderr, so stdout is only the command's output.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Any, Final, TypeVar

import click

from daemon._errors import DaemonError
from daemon.config import Config, load_config
from daemon.logs import configure_logging
from eventstore import EventDecoder, Store, StoreError
from eventstore.importers import FORMATS, import_dataset

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])
#: Where `rerankd demo` looks for the public demo data, in order.
DEMO_DATASETS: Final = (
    Path("../shared/datasets/ml-100k"),
    Path("shared/datasets/ml-100k"),
    Path("/work/shared/datasets/ml-100k"),
)


def _friendly(fn: F) -> F:
    """Turn our errors into one clear line and exit status 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            # the reader went away (`rerankd summary | head`): stop quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except (DaemonError, StoreError, ValueError, OSError) as e:
            raise click.ClickException(str(e)) from e

    return wrapper  # type: ignore[return-value]


@contextmanager
def _store(config: Config) -> Iterator[Store]:
    s = config.store
    with Store(
        s.data_dir,
        fold=config.fold,
        synchronous=s.synchronous,  # type: ignore[arg-type]
        snapshot_every=s.snapshot_every_events,
        keep_snapshots=s.keep_snapshots,
        decoder=EventDecoder(config.limits),
    ) as store:
        yield store


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="RERANKD_CONFIG",
    help="TOML config (default: the embedded default, ./var/).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


@click.group()
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def main(log_level: str) -> None:
    """rerankd: a real-time, event-sourced personalized re-ranking daemon."""
    configure_logging(level=log_level)


@main.command()
@click.option(
    "--log-level",
    "run_log_level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@config_option
@_friendly
def run(run_log_level: str, config_path: Path | None) -> None:
    """Run the daemon: serve the socket API until SIGTERM (logs are JSON on stdout)."""
    from daemon.service import run as run_daemon  # noqa: PLC0415 - JAX loads only for the daemon

    configure_logging(stream=sys.stdout, level=run_log_level)
    sys.exit(run_daemon(load_config(config_path)))


@main.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    required=True,
    help="sasrec: 'user item' lines; movielens: u.data/ratings.dat (+ item file).",
)
@click.option(
    "--type",
    "event_type",
    default="view",
    show_default=True,
    help="Event type of sasrec interactions.",
)
@config_option
@_friendly
def import_cmd(path: Path, fmt: str, event_type: str, config_path: Path | None) -> None:
    """Append a dataset to the event log (idempotent: re-importing adds nothing)."""
    config = load_config(config_path)
    with _store(config) as store:
        report = import_dataset(store, path, fmt=fmt, event_type=event_type)  # type: ignore[arg-type]
    click.echo(
        f"imported {report.accepted} events ({report.duplicates} already in the log) "
        f"from {path} in {report.seconds:.1f} s"
    )
    if report.time_shift_s:
        click.echo(
            f"event times shifted by {report.time_shift_s / 86400:.0f} days "
            "(the format requires times from 2000 on)"
        )


@main.command()
@json_option
@config_option
@_friendly
def summary(as_json: bool, config_path: Path | None) -> None:  # noqa: FBT001
    """Print the state summary: users, items, events, most popular items."""
    config = load_config(config_path)
    with _store(config) as store:
        _print_summary(store, config, as_json=as_json)


def _print_summary(store: Store, config: Config, *, as_json: bool) -> None:
    data = store.state.summary()
    data["log"] = store.log.stats()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    log = data["log"]
    click.echo(f"state of {config.store.data_dir}/ (log offset {data['offset']})")
    click.echo(f"  users        {data['users']:>10,}")
    click.echo(f"  items        {data['items']:>10,}   categories {data['categories']:,}")
    click.echo(f"  interactions {data['interactions']:>10,}   impressions {data['impressions']:,}")
    click.echo(
        f"  log          {log['events']:>10,} events, {log['dead_letters']} dead letters, "
        f"{(log['bytes_db'] + log['bytes-wal']) / 1e6:.1f} MB"
    )
    click.echo(f"  state        {data['bytes_per_user']} bytes per user (L = {data['seq_len']})")
    click.echo("  most popular now:")
    for row in data["top_items"]:
        title = f"  {row['title']}" if row.get("title") else ""
        click.echo(f"    {row['item']:<12} {row['popularity']:>10.3f}{title}")


@main.command()
@click.option(
    "--dataset",
    type=click.Path(exists=True, path_type=Path),
    help="Default: ../shared/datasets/ml-100k (MovieLens 100K).",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="movielens", show_default=True)
@config_option
@_friendly
def demo(dataset: Path | None, fmt: str, config_path: Path | None) -> None:
    """Import the public demo data into the embedded default and print the state summary."""
    dataset = dataset or next((p for p in DEMO_DATASETS if p.exists()), None)
    if dataset is None:
        msg = (
            "dataset: the demo data was not found at "
            f"{', '.join(map(str, DEMO_DATASETS))}; pass --dataset PATH"
        )
        raise click.ClickException(msg)
    config = load_config(config_path)
    with _store(config) as store:
        report = import_dataset(store, dataset, fmt=fmt)  # type: ignore[arg-type]
        click.echo(
            f"imported {report.accepted} new events from {dataset} "
            f"({report.duplicates} were already in the log) in {report.seconds:.1f} s\n"
        )
        _print_summary(store, config, as_json=False)
    click.echo("\nnext: `rerankd user 1` shows user 1's state; `rerankd log` inspects the log")


@main.command()
@click.argument("user")
@config_option
@_friendly
def user(user: str, config_path: Path | None) -> None:
    """Print one user's state (recent items, interests, counters) as JSON."""
    with _store(load_config(config_path)) as store:
        view = store.state.user_view(user)
    if view is None:
        raise click.ClickException("user: not in the state (never seen, or forgotten)")
    click.echo(json.dumps(view, indent=2))


@main.command()
@click.argument("item")
@config_option
@_friendly
def item(item: str, config_path: Path | None) -> None:
    """Print one item's popularity, counters and metadata as JSON."""
    with _store(load_config(config_path)) as store:
        view = store.state.item_view(item)
    if view is None:
        raise click.ClickException("item: not in the state")
    click.echo(json.dumps(view, indent=2))


@main.command()
@click.option(
    "--dead-letters",
    "dead",
    default=0,
    show_default=True,
    help="Also show the N most recent dead letters.",
)
@config_option
@_friendly
def log(dead: int, config_path: Path | None) -> None:
    """Inspect the event log: tables, sizes, feed positions, dead letters."""
    with _store(load_config(config_path)) as store:
        out: dict[str, Any] = {
            "tables": store.log.stats(),
            "feed_positions": {f"{f}/{p}": v for (f, p), v in store.log.positions().items()},
        }
        if dead:
            out["dead_letters"] = [
                {"seq": d.seq, "source": d.source, "reason": d.reason, "size": d.size}
                for d in store.log.read_dead_letters(limit=dead)
            ]
    click.echo(json.dumps(out, indent=2))


@main.command()
@config_option
@_friendly
def snapshot(config_path: Path | None) -> None:
    """Write a snapshot of the state now."""
    with _store(load_config(config_path)) as store:
        path = store.snapshot()
    click.echo(f"wrote {path}")


@main.command()
@click.argument("user")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_option
@_friendly
def forget(user: str, yes: bool, config_path: Path | None) -> None:  # noqa: FBT001
    """Erase a user from the log, the state and the snapshots (irreversible)."""
    if not yes:
        click.confirm("erase this user everywhere? this cannot be undone", abort=True)
    with _store(load_config(config_path)) as store:
        deleted = store.forget(user)
    click.echo(f"erased: {deleted} events deleted, tombstone kept")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(__file__))
