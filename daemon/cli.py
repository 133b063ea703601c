"""
The ``rerankd`` command line.

``rank``, ``ingest``, ``user``, ``stats``, ``export`` and ``forget`` ask the running daemon
over its socket (``user`` and ``forget`` open the store directly with ``--offline``,
for a stopped daemon); ``publish`` sends events to an MQTT or Kafka broker, for the daemon's
feeds; ``import``, ``summary``, ``item``, ``log`` and ``snapshot`` open the store
directly; ``train``, ``eval`` and ``replay`` train and measure models offline
(``daemon/_quality_cli.py``); ``check-config`` and ``plugins`` show the configuration and
the registered plugins. Errors become one line ``rerankd: …`` on stderr and exit status 1
(`CliError`); logs go to stderr, so stdout is only the command's output.

Whatever writes or looks up users offline (``import``, ``demo``, ``user`` and
``forget`` with ``--offline``) goes through the configured privacy plugins as the
daemon does, so the same raw id reaches the same stored user either way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import click

from daemon._cli_socket import (
    CliError,
    IngestReport,
    ask,
    connect,
    count_lines,
    ingest,
    read_batches,
    render_export,
    render_ingest,
    render_ranking,
    render_stats,
    render_user,
)
from daemon._errors import DaemonError
from daemon._plugins import check_user_ids, load_plugins
from daemon._quality_cli import eval_command, replay_command, train_command
from daemon.config import Config, load_config
from daemon.logs import configure_logging
from eventstore import EventDecoder, Store, StoreError
from eventstore.importers import FORMATS, import_dataset
from plugins.registry import REGISTRY, PrivacyChain

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
            raise CliError(str(e)) from e

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


def _privacy(config: Config, store: Store) -> PrivacyChain:
    """The configured privacy plugins, checked against the ids ``store`` holds."""
    plugins = load_plugins(config)
    check_user_ids(store.log, plugins)
    return plugins.privacy


config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="RERANKD_CONFIG",
    help="TOML config (default: the embedded default, ./var/).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
socket_option = click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="RERANKD_SOCKET",
    help="The daemon's socket (default: [server].socket_path of the config).",
)
offline_option = click.option(
    "--offline",
    is_flag=True,
    help="Open the store directly instead of asking the daemon (only while it is stopped).",
)
_LEVELS: Final = click.Choice(["debug", "info", "warning", "error"])
daemon_log_level_option = click.option(
    "--log-level",
    "run_log_level",
    default="info",
    show_default=True,
    type=_LEVELS,
    help="The daemon's log level (its logs go to stdout).",
)


def _socket(config_path: Path | None, socket_path: Path | None) -> Path:
    """``--socket``, else the config's [server].socket_path."""
    return socket_path or load_config(config_path).server.socket_path


def _ask(
    config_path: Path | None, socket_path: Path | None, op: str, *, offline_hint: bool = False,
    **fields: Any,
) -> dict[str, Any]:  # fmt: skip
    """One request to the daemon; its answer, or a `CliError`."""
    with connect(_socket(config_path, socket_path), offline_hint=offline_hint) as client:
        return ask(client, op, **fields)


@click.group()
@click.option("--log-level", default="warning", show_default=True, type=_LEVELS)
def main(log_level: str) -> None:
    """rerankd: a real-time, event-sourced personalized re-ranking daemon."""
    configure_logging(level=log_level)


@main.command()
@daemon_log_level_option
@config_option
@_friendly
def run(run_log_level: str, config_path: Path | None) -> None:
    """Run the daemon: serve the socket API until SIGTERM (logs on stdout, JSON off a tty)."""
    _serve(load_config(config_path), run_log_level)


def _serve(config: Config, log_level: str) -> None:
    from daemon.service import run as run_daemon  # noqa: PLC0415 - JAX loads only for the daemon

    configure_logging(stream=sys.stdout, level=log_level)
    sys.exit(run_daemon(config))


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
        privacy = _privacy(config, store)
        report = import_dataset(store, path, fmt=fmt, event_type=event_type,  # type: ignore[arg-type]
                                transform=privacy.ingest)  # fmt: skip
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


@main.command()
@json_option
@config_option
@_friendly
def experiments(as_json: bool, config_path: Path | None) -> None:  # noqa: FBT001
    """
    Report every A/B test and interleaving in the log: impressions, clicks, CTR, wins.

    Reads the event log (also while the daemon runs): impressions recorded by the
    ``experiment`` policy, and clicks sent with the ranking_id of the answer.
    """
    from eventstore.log import EventLog  # noqa: PLC0415
    from eventstore.store import LOG_FILE  # noqa: PLC0415
    from plugins.policies.experiment import experiment_report  # noqa: PLC0415 - scipy

    config = load_config(config_path)
    path = config.store.data_dir / LOG_FILE
    if not path.exists():
        raise CliError(f"{path}: no event log here ([store].data_dir)")
    log = EventLog(path, synchronous="NORMAL")
    try:
        report = experiment_report(event for _, event in log.read())
    finally:
        log.close()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(_experiments_table(report))


def _experiments_table(report: Mapping[str, Any]) -> str:
    if not report["experiments"]:
        return "no experiment in the log (impressions of the experiment policy)"
    lines = []
    for e in report["experiments"]:
        lines.append(f"experiment {e['name']} ({e['mode']})")
        for arm in e["arms"] if e["mode"] == "ab" else ():
            lo, hi = arm["ctr_ci95"]
            versus = arm.get("vs_first")
            cmp = (f"  lift {versus['lift']:+.1%} p={versus['p_value']:.3g}"
                   if versus else "  (baseline)")  # fmt: skip
            lines.append(f"  {arm['arm']:<16} {arm['impressions']:>9,} shown {arm['clicks']:>8,} "
                         f"clicks  CTR {arm['ctr']:.4f} [{lo:.4f}, {hi:.4f}]{cmp}")  # fmt: skip
        if e["mode"] != "ab":
            wins = "  ".join(f"{arm} {n:,}" for arm, n in e["wins"].items())
            lines.append(f"  {e['impressions']:,} shown, {e['clicked']:,} with clicks: wins "
                         f"{wins}, ties {e['ties']:,}; preference {e['preference']:+.3f} "
                         f"p={e['p_value']:.3g}")  # fmt: skip
    return "\n".join(lines)


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
@click.option("--no-serve", is_flag=True, help="Import and print only; do not run the daemon.")
@daemon_log_level_option
@config_option
@_friendly
def demo(
    *, dataset: Path | None, fmt: str, no_serve: bool, run_log_level: str,
    config_path: Path | None,
) -> None:  # fmt: skip
    """
    The main job: import the demo data, then run the daemon on it.

    Imports the public demo data into the embedded default (idempotent), prints the
    state summary and how to query the daemon, then serves the socket API in the
    foreground (logs on stdout) until Ctrl-C or SIGTERM.
    """
    dataset = dataset or next((p for p in DEMO_DATASETS if p.exists()), None)
    if dataset is None:
        msg = (
            "dataset: the demo data was not found at "
            f"{', '.join(map(str, DEMO_DATASETS))}; pass --dataset PATH"
        )
        raise CliError(msg)
    config = load_config(config_path)
    with _store(config) as store:
        privacy = _privacy(config, store)
        report = import_dataset(store, dataset, fmt=fmt, transform=privacy.ingest)  # type: ignore[arg-type]
        click.echo(
            f"imported {report.accepted} new events from {dataset} "
            f"({report.duplicates} were already in the log) in {report.seconds:.1f} s\n"
        )
        _print_summary(store, config, as_json=False)
    click.echo(_demo_next_steps(config, config_path, serving=not no_serve))
    if not no_serve:
        _serve(config, run_log_level)


def _demo_next_steps(config: Config, config_path: Path | None, *, serving: bool) -> str:
    flag = f" --config {config_path}" if config_path else ""
    when = (
        "from another terminal, while this one runs the daemon (Ctrl-C stops it)"
        if serving
        else f"once the daemon runs (`rerankd run{flag}`)"
    )
    commands = [
        (f"rerankd rank 1 50 181 100{flag}", "rank movies 50, 181 and 100 for user 1"),
        (f"rerankd rank 1 50 181 100 --explain{flag}", "the same, with each score's parts"),
        (f"rerankd user 1{flag}", "user 1's state"),
        (f"rerankd ingest events.jsonl{flag}", "send events (JSON lines) to the daemon"),
        (f"rerankd stats{flag}", "the daemon's counters"),
    ]
    width = max(len(c) for c, _ in commands)
    lines = [f"\nquery it {when}:"]
    lines += [f"  {c:<{width}}  # {what}" for c, what in commands]
    lines.append(f"the socket is {config.server.socket_path}: one JSON request per line")
    return "\n".join(lines)


# ------------------------------------------------------------------ over the socket


@main.command()
@click.argument("user")
@click.argument("items", nargs=-1, required=True)
@click.option("-k", "--k", "k", type=click.IntRange(min=1), help="Return at most K items.")
@click.option("--explain", is_flag=True, help="Show the parts of each score.")
@json_option
@socket_option
@config_option
@_friendly
def rank(
    *, user: str, items: tuple[str, ...], k: int | None, explain: bool, as_json: bool,
    socket_path: Path | None, config_path: Path | None,
) -> None:  # fmt: skip
    """Ask the daemon to rank ITEMS for USER; prints them best first."""
    fields: dict[str, Any] = {"user": user, "candidates": list(items), "explain": explain}
    if k is not None:
        fields["k"] = k
    answer = _ask(config_path, socket_path, "rank", **fields)
    click.echo(json.dumps(answer, indent=2) if as_json else render_ranking(answer))


@main.command("ingest")
@click.argument(
    "source", default="-", type=click.Path(exists=True, dir_okay=False, allow_dash=True)
)
@click.option(
    "--batch", "batch_size", default=500, show_default=True, type=click.IntRange(1, 100_000),
    help="Events per ingest request.",
)  # fmt: skip
@click.option(
    "--window", default=4, show_default=True, type=click.IntRange(1, 64),
    help="Requests in flight at once (1 keeps the input's order exactly).",
)  # fmt: skip
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@socket_option
@config_option
@_friendly
def ingest_cmd(
    *, source: str, batch_size: int, window: int, quiet: bool,
    socket_path: Path | None, config_path: Path | None,
) -> None:  # fmt: skip
    """
    Send events to the daemon, from SOURCE or stdin (`-` or no SOURCE).

    SOURCE holds JSON lines (one event object per line) or one JSON array. Duplicate
    ids are no-ops, so sending a file again adds nothing. Prints what was accepted,
    duplicated and rejected (with line numbers); exit status 1 when an event was
    rejected or could not be sent.
    """
    config = load_config(config_path)
    report = IngestReport()
    with (
        connect(socket_path or config.server.socket_path, timeout_s=120) as client,
        _input(source) as stream,
        _progress(source, quiet=quiet) as bar,
    ):
        batches = read_batches(
            stream, report, bar, size=batch_size, max_line_bytes=config.server.max_line_bytes
        )
        ingest(client, batches, report, bar, window=window)
    click.echo(render_ingest("stdin" if source == "-" else source, report))
    if report.failure:
        raise CliError(report.failure)
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument(
    "source", default="-", type=click.Path(exists=True, dir_okay=False, allow_dash=True)
)
@click.option("--mqtt", "mqtt_url", metavar="URL", help="Publish to this MQTT broker "
              "(mqtt://host:port), at QoS 1.")  # fmt: skip
@click.option("--kafka", "kafka_bootstrap", metavar="HOST:PORT",
              help="Publish to this Kafka cluster, keyed by user id.")  # fmt: skip
@click.option("--topic", required=True, help="The MQTT topic or Kafka topic.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_friendly
def publish(
    *, source: str, mqtt_url: str | None, kafka_bootstrap: str | None, topic: str, quiet: bool
) -> None:
    """
    Publish events from SOURCE or stdin to an MQTT or a Kafka topic.

    SOURCE holds JSON lines; each non-empty line becomes one message, sent as it is
    (the daemon's feed validates it and dead-letters what is bad). Every message is
    acknowledged by the broker (MQTT QoS 1 PUBACK; Kafka acks=all) before this exits 0.
    """
    if (mqtt_url is None) == (kafka_bootstrap is None):
        msg = "give exactly one of --mqtt URL or --kafka HOST:PORT"
        raise click.UsageError(msg)
    import asyncio  # noqa: PLC0415 - only publish runs an event loop here

    if mqtt_url is not None:
        from daemon.feeds.mqtt import publish as send  # noqa: PLC0415
    else:
        from daemon.feeds.kafka import publish as send  # noqa: PLC0415
    target = mqtt_url or kafka_bootstrap or ""
    with _input(source) as stream, _progress(source, quiet=quiet, desc="publish") as bar:
        payloads = (line.strip() for line in stream)
        try:
            sent = asyncio.run(send(target, topic, (p for p in payloads if p),
                                    on_sent=bar.update))  # fmt: skip
        except (DaemonError, StoreError, ValueError, OSError):
            raise
        except Exception as e:  # aiomqtt's MqttError, aiokafka's KafkaError, ...
            what = "MQTT broker" if mqtt_url else "Kafka cluster"
            msg = f"publish to the {what} at {target} failed: {type(e).__name__}: {e}"
            raise CliError(msg) from e
    broker = "MQTT" if mqtt_url else "Kafka"
    click.echo(f"published {sent} events to {broker} topic {topic}")


@contextmanager
def _input(source: str) -> Iterator[IO[bytes]]:
    if source != "-":
        with Path(source).open("rb") as f:
            yield f
        return
    if sys.stdin.isatty():
        click.echo("reading events from stdin (JSON lines; Ctrl-D ends)", err=True)
    yield sys.stdin.buffer


@contextmanager
def _progress(source: str, *, quiet: bool, desc: str = "ingest") -> Iterator[Any]:
    """A tqdm bar on stderr, only when stderr is a terminal and not ``quiet``."""
    from tqdm import tqdm  # noqa: PLC0415 - only ingest draws one

    disable = quiet or not sys.stderr.isatty()
    total = None if disable or source == "-" else count_lines(Path(source))
    with tqdm(
        total=total,
        unit=" events",
        unit_scale=True,
        desc=desc,
        file=sys.stderr,
        disable=disable,
    ) as bar:
        yield bar


@main.command()
@json_option
@socket_option
@config_option
@_friendly
def stats(*, as_json: bool, socket_path: Path | None, config_path: Path | None) -> None:
    """Print the daemon's counters, queue depths and cache figures."""
    answer = _ask(config_path, socket_path, "stats")
    body = {k: v for k, v in answer.items() if k not in {"id", "ok"}}
    click.echo(json.dumps(body, indent=2) if as_json else render_stats(body))


@main.command()
@click.option("--offset", default=0, show_default=True, type=click.IntRange(min=0),
              help="The first item row of the page.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Most items in the page (the daemon takes up to 100,000).")
@json_option
@socket_option
@config_option
@_friendly
def export(
    *, offset: int, limit: int, as_json: bool, socket_path: Path | None,
    config_path: Path | None,
) -> None:  # fmt: skip
    """Print per-item impressions, clicks, popularity and CTR (noised with `noise` on)."""
    answer = _ask(config_path, socket_path, "export", offset=offset, limit=limit)
    body = {k: v for k, v in answer.items() if k not in {"id", "ok"}}
    click.echo(json.dumps(body, indent=2) if as_json else render_export(body))


@main.command()
@click.argument("user")
@offline_option
@json_option
@socket_option
@config_option
@_friendly
def user(
    *, user: str, offline: bool, as_json: bool, socket_path: Path | None,
    config_path: Path | None,
) -> None:  # fmt: skip
    """Print one user's state: recent items, interests, counters."""
    if offline:
        config = load_config(config_path)
        with _store(config) as store:
            view = store.state.user_view(_privacy(config, store).user_id(user))
        if view is None:
            raise CliError("user: not in the state (never seen, or forgotten)")
    else:
        view = _ask(config_path, socket_path, "user", offline_hint=True, user=user)["user"]
    click.echo(json.dumps(view, indent=2) if as_json else render_user(user, view))


@main.command()
@click.argument("user")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@offline_option
@socket_option
@config_option
@_friendly
def forget(
    *, user: str, yes: bool, offline: bool, socket_path: Path | None, config_path: Path | None
) -> None:
    """Erase USER from the log, the state and the snapshots (irreversible)."""
    question = f"erase user {user} everywhere? this cannot be undone"
    if offline:
        if not yes:
            click.confirm(question, abort=True)
        config = load_config(config_path)
        with _store(config) as store:
            deleted = store.forget(_privacy(config, store).user_id(user))
        click.echo(f"erased: {deleted} events deleted, tombstone kept")
        return
    with connect(_socket(config_path, socket_path), offline_hint=True) as client:
        if not yes:  # asked once the daemon is known to be there
            click.confirm(question, abort=True)
        ask(client, "forget", user=user)
    click.echo(f"erased user {user} everywhere; a tombstone is kept")


# ------------------------------------------------------------------ the store, offline


@main.command()
@click.argument("item")
@config_option
@_friendly
def item(item: str, config_path: Path | None) -> None:
    """Print one item's popularity, counters and metadata as JSON."""
    with _store(load_config(config_path)) as store:
        view = store.state.item_view(item)
    if view is None:
        raise CliError("item: not in the state")
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


@main.command("check-config")
@json_option
@config_option
@_friendly
def check_config(*, as_json: bool, config_path: Path | None) -> None:
    """
    Check the config strictly and print every key's effective value.

    The listed plugins are built without side effects (no key is generated), so
    their parameters are checked too; each plugin's unset parameters are shown as
    comments with their defaults.
    """
    config = load_config(config_path)
    load_plugins(config, dry_run=True)
    sections = _config_sections(config)
    plugins = _plugin_params(config)
    if as_json:
        section = config.plugins
        body = {"privacy": list(section.privacy), "policies": list(section.policies),
                **{name: configured | defaults for name, (configured, defaults) in plugins.items()}}
        click.echo(json.dumps({"source": config.source, **sections, "plugins": _plain(body)},
                              indent=2))  # fmt: skip
        return
    click.echo(f"# the effective config from {config.source}, defaults filled in")
    for name, values in sections.items():
        click.echo(f"\n[{name}]")
        for key, value in values.items():
            click.echo(f"{key} = {_toml_value(key, value)}")
    click.echo("\n[plugins]")
    click.echo(f"privacy = {_toml_value('', list(config.plugins.privacy))}")
    click.echo(f"policies = {_toml_value('', list(config.plugins.policies))}")
    for name, (configured, defaults) in plugins.items():
        click.echo(f"\n[plugins.{_toml_key(name)}]")
        for key, value in configured.items():
            click.echo(f"{_toml_key(key)} = {_toml_value(key, _plain(value))}")
        for key, value in defaults.items():
            text = ("(no default)" if value is ... else "(unset)" if value is None
                    else _toml_value(key, _plain(value)))  # fmt: skip
            click.echo(f"# {_toml_key(key)} = {text}  (the default)")


def _plugin_params(config: Config) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Per listed plugin: (the parameters set in the config, the defaults of the rest)."""
    out = {}
    for name in config.plugins.names:
        configured = dict(config.plugins.params.get(name, {}))
        defaults = {k: v for k, v in REGISTRY.defaults(name).items() if k not in configured}
        out[name] = (configured, defaults)
    return out


@main.command("plugins")
@json_option
@_friendly
def plugins_cmd(*, as_json: bool) -> None:
    """List the plugins registered in the entry-point group rerankd.plugins (none imported)."""
    found = [dataclasses.asdict(info) for info in REGISTRY.info()]
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    width = max((len(p["name"]) for p in found), default=0)
    for p in found:
        click.echo(f"{p['name']:<{width}}  {p['value']}  ({p['distribution']})")


def _config_sections(config: Config) -> dict[str, dict[str, Any]]:
    """
    Every section of ``config`` as plain JSON-able values, in declaration order.

    All but ``[plugins]``, which is printed apart, as one table per plugin.
    """
    sections = {}
    for f in dataclasses.fields(config):
        section = getattr(config, f.name)
        if dataclasses.is_dataclass(section) and f.name != "plugins":
            sections[f.name] = {
                g.name: _plain(getattr(section, g.name)) for g in dataclasses.fields(section)
            }
    return sections


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")


def _toml_value(key: str, value: Any) -> str:  # noqa: PLR0911 - one return per TOML type
    """``value`` written as TOML that `load_config` reads back to the same value."""
    if value is None:
        return '""  # unset'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and key.endswith("_mode"):
        return oct(value)  # permission bits read best in octal, which TOML allows
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value("", v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{_toml_key(k)} = {_toml_value(k, v)}" for k, v in value.items())
        return "{ " + ", ".join(pairs) + " }" if value else "{}"
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_value("", key)


for _command in (train_command, eval_command, replay_command):
    main.add_command(_command)


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="rerankd")
