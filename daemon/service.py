"""
The daemon: one asyncio process tying together the log, state, kernels and socket.

It follows DESIGN.md's data flow, and its lifecycle is systemd's.

Threads. The event loop only parses, routes and answers. The store is written by the
group-commit writer thread (append + fold); kernels and state reads run on one
kernel thread. Nothing blocking runs on the loop.

Lifecycle (`run`): open the store (snapshot + replay), load the model and compile
every kernel bucket, bind or inherit the socket, ``READY=1``; serve until SIGTERM or
SIGINT; then ``STOPPING=1``, stop accepting, let in-flight requests finish within
``graceful_timeout_s``, flush the writer, write a snapshot, exit 0.

Storage faults (disk full, read-only or failing file system under ``data_dir``): the
writer's group fails as a whole, unfolded, and the writer holds a *storage
unavailable* condition (`eventstore.committer`) until its probe, `Store.recover`,
finds the log writable again (with `RESUME_FREE_BYTES` free). Meanwhile ``ingest``
and ``forget`` answer ``storage_unavailable`` (nothing stored), the feeds hold their
batches unacknowledged (`daemon.feeds.sink`), impressions are dropped and counted,
automatic snapshots are skipped, and rank answers from the state in memory; ``stats``
(``storage``) and the ``rerankd_storage_*`` gauges show it, and the log says
``storage_unavailable`` once per episode and ``storage_available`` at its end. The
daemon neither exits nor restarts for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import os
import signal
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import structlog

from daemon._errors import DaemonError
from daemon._export import item_aggregates
from daemon._malloc import MMAP_THRESHOLD, tune_malloc
from daemon._model import (
    NO_MODEL,
    TRAINED_MODEL,
    ModelRefusedError,
    ServedModel,
    feature_weights,
    load_served_model,
)
from daemon._plugins import Plugins, check_user_ids, load_plugins
from daemon._retention import RetentionSweeper
from daemon._stopping import cancel_dump, dump_threads_later, hurry
from daemon.autotrain import train_from_log
from daemon.candidates import Candidates
from daemon.config import DEFAULTS_SOURCE, Config, load_config
from daemon.feeds import FeedSink
from daemon.metrics import Metrics
from daemon.online import OnlineLearner
from daemon.protocol import (
    Export,
    Forget,
    Health,
    Ingest,
    ProtocolError,
    Rank,
    Request,
    RequestDecoder,
    Stats,
    UserInfo,
)
from daemon.ranking import RankedList, Ranking
from daemon.server import Server, bind_unix_socket
from daemon.systemd import inherited_socket, notify, watchdog_interval_s
from eventstore import BackpressureError, EventDecoder, GroupCommitter, Store, StoreFullError
from eventstore.schema import Event, ItemsShown, Rejection, UserForgotten
from eventstore.store import LOG_FILE
from plugins.registry import PrivacyChain

__all__ = ["TRAINED_MODEL", "Service", "ShutdownRequested", "run"]

_log = structlog.get_logger("daemon.service")
_IMPRESSION_FLUSH_S = 0.005
_REFRESH_CHUNK = 8  # users re-encoded per refresher job: short jobs, so batches never wait long
_COLD_START_TICK_S = 1.0  # how often the cold-start vectors are checked (and rebuilt if stale)
_MAX_PENDING_IMPRESSIONS = 100_000


class ShutdownRequested(Exception):  # noqa: N818 - control flow, not an error (STYLE.md 6)
    """Raised by the task that watches for SIGTERM/SIGINT, to end the TaskGroup."""


class _Batcher:
    """
    Micro-batching of rank requests: concurrent requests share one kernel call.

    The batcher takes the first waiting request and everything else already waiting
    (up to ``max_batch``), encodes the vectors the batch needs on the kernel thread in
    one call, and ranks the batch; a lone request never waits, and under load batches
    grow while the previous one runs.

    Most rank requests never reach it: the server hands the rank requests of each turn
    of the loop to `Service.rank_now`, which ranks them together at once when their
    vectors are cached. The batcher serves the rest (a vector to encode, or a batch
    already running).

    Where a batch runs. Ranking itself runs on the event loop; only the encoder call
    (JAX, which runs without the GIL for milliseconds) goes to the kernel thread, so
    the loop keeps serving meanwhile (`daemon.ranking.EncodeJob`). This departs from
    our rule that kernel work stays off the loop, for a measured reason: a batch is
    mostly Python (compiled loops of a few µs per request between), and Python on two
    threads takes turns on the GIL. When whole batches ran on the kernel thread, each
    GIL hand-off made the loop wait: writing a 500-byte answer (which releases the GIL
    for its system call) took 80 µs at p50 on the 2-core development machine instead
    of a few, and the daemon topped out at about 2,300 rank/s at 32 connections against
    about 3,000 with cached batches on the loop; and under a loop kept busy by the
    feeds, the kernel thread waited up to the 5 ms switch interval for the GIL after
    every step of a batch.
    """

    def __init__(
        self, ranking: Ranking, executor: ThreadPoolExecutor, max_batch: int, metrics: Metrics
    ) -> None:
        self._ranking = ranking
        self._metrics = metrics
        self._executor = executor
        self.max_batch = max_batch
        self._queue: asyncio.Queue[tuple[Rank, asyncio.Future[RankedList]]] = asyncio.Queue(
            maxsize=max_batch * 64
        )
        self._busy = False  # a batch's encode is running on the kernel thread
        self._idle = asyncio.Event()  # set while no request waits and no batch runs
        self._idle.set()

    @property
    def busy(self) -> bool:
        """A batch is encoding on the kernel thread, or requests wait for one."""
        return self._busy or not self._queue.empty()

    async def wait_idle(self) -> None:
        """Return once no rank request waits for the batcher and no batch of it runs."""
        await self._idle.wait()

    @property
    def depth(self) -> int:
        """Rank requests waiting for the next batch."""
        return self._queue.qsize()

    async def rank(self, request: Rank) -> RankedList:
        """Rank one request in the next batch."""
        future: asyncio.Future[RankedList] = asyncio.get_running_loop().create_future()
        self._idle.clear()
        await self._queue.put((request, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            requests = [r for r, _ in batch]
            try:
                job = self._ranking.encode_job(requests)
                if job is not None:
                    self._busy = True
                    try:
                        await loop.run_in_executor(self._executor, job.run)
                    finally:
                        self._busy = False
                    self._ranking.store(job)
                results = self._ranking.rank_batch(requests, encoded=job)
            except Exception as error:  # noqa: BLE001 - a kernel failure fails this batch only
                _log.exception("rank_batch_failed", size=len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            finally:
                if self._queue.empty():
                    self._idle.set()
            self._metrics.batch_size.observe(len(batch))
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class Service:
    """The daemon's parts and its request handlers."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started = time.time()
        self.kernel_thread = ThreadPoolExecutor(1, thread_name_prefix="daemon[kernels]")
        self._cold_start_thread = ThreadPoolExecutor(1, thread_name_prefix="daemon[cold-start]")
        self.store: Store | None = None
        self.committer: GroupCommitter | None = None
        self.ranking: Ranking | None = None
        self.batcher: _Batcher | None = None
        self.decoder = EventDecoder(config.limits)
        self.model = NO_MODEL
        # the configured plugins, built by open(); until then nothing is mapped or stored
        self.plugins = Plugins(PrivacyChain(), ())
        self._impressions: list[ItemsShown] = []
        self._impressions_waiting = asyncio.Event()
        self.metrics = Metrics()
        self.server: Server | None = None
        self.feeds: list[Any] = []  # daemon.feeds' MqttFeed / KafkaFeed, when configured
        self.feed_sink: FeedSink | None = None  # what the feeds append through
        self.retention: RetentionSweeper | None = None  # built by open()
        self.online: OnlineLearner | None = None  # the [online] step, when enabled
        self._last_snapshot = (time.monotonic(), -1)  # (when, state offset it covered)
        # ranking ids: a random per-process prefix and a counter (unique without uuid4's
        # 2.5 µs of os.urandom per answer)
        prefix = f"r-{uuid.uuid4().hex[:16]}-"
        self._touched: set[int] = set()  # user rows waiting for the vector refresher
        self._touched_lock = threading.Lock()
        self._refresh_wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._training: threading.Thread | None = None
        self._op_counters: dict[str, Any] = {}  # op -> its child of the requests counter
        self._ranking_ids = map(f"{prefix}{{:x}}".format, itertools.count()).__next__

    # ---------------------------------------------------------------- set-up

    def open(self) -> None:
        """
        Build the plugins, open the store, load and warm up the model.

        Blocking: call it from a thread.
        """
        s = self.config.store
        self.plugins = load_plugins(self.config)
        self.store = Store(
            s.data_dir,
            fold=self.config.fold,
            synchronous=s.synchronous,  # type: ignore[arg-type]
            snapshot_every=s.snapshot_every_events,
            keep_snapshots=s.keep_snapshots,
            decoder=self.decoder,
        )
        check_user_ids(self.store.log, self.plugins)
        _log_plugins(self.plugins)
        self._last_snapshot = (time.monotonic(), self.store.state.offset)
        self.committer = GroupCommitter(
            self._append, name="daemon[writer]", dead_letter_sink=self.store.log.dead_letters,
            probe=self.store.recover, on_storage=self._storage_changed,
        )  # fmt: skip
        # reads the plugins before every sweep: a reload may add, change or remove retention
        self.retention = RetentionSweeper(
            self.store, self.committer, self.metrics,
            settings=lambda: self.plugins.retention, on_snapshot=self._snapshot_written,
        )  # fmt: skip
        self.feed_sink = FeedSink(self.committer, self.decoder, self.store.log.path,
                                  self.metrics, privacy=self.privacy_ingest)  # fmt: skip
        self.feeds = _make_feeds(self.config, self.feed_sink)
        self.model = self._first_model()
        store = self.store
        self.ranking = Ranking(
            lambda: store.state, ranker=self.model.ranker, vocabulary=self.model.vocabulary,
            weights=feature_weights(self.config), policies=self.plugins.policies,
            cold_start=self.config.ranking.cold_start,
        )  # fmt: skip
        self._warm_policies()
        self.batcher = _Batcher(
            self.ranking, self.kernel_thread, self.config.ranking.max_batch, self.metrics
        )
        # compile the rank path's loops now (numba, cached on disk after the first
        # start), not on the first request: an unknown user and item, nothing written
        self.ranking.rank_batch([Rank(user="-", candidates=Candidates.parse(
            b'["-"]', max_count=1, max_id_bytes=1), explain=True)])  # fmt: skip
        self.ranking.refresh_cold_start()  # the first cold-start vectors, before READY
        self._register_gauges()
        if self.config.metrics.listen:
            host, port = self.metrics.serve(self.config.metrics.listen)
            _log.info("metrics_serving", address=f"{host}:{port}")

    def _first_model(self) -> ServedModel:
        """
        The model to start with (blocking): `load_served_model` on the restored state.

        A refused file named by ``[ranking].model_path`` is a start-up error (the
        operator asked for that model; systemd shows the reason). A refused file
        trained from the log (``<data_dir>/model.safetensors``, no model_path) is
        logged and set aside instead: the daemon starts ranking by features and, with
        ``train_on_start``, trains a new one, so a bad retrain cannot keep it down.
        """
        assert self.store is not None
        try:
            return load_served_model(self.config, self.store.state)
        except ModelRefusedError as error:
            _log.error("model_refused", reason=error.reason, error=str(error), at="start")
            if self.config.ranking.model_path is not None:
                raise
            return NO_MODEL

    def _warm_policies(self) -> None:
        """Compile what the policies compile (MMR's kernel) now, not on a request."""
        ranker = self.model.ranker
        for policy in self.plugins.policies:
            warm_up = getattr(policy, "warm_up", None)
            if warm_up is not None and ranker is not None:
                warm_up(ranker.config.vector_dim, max_candidates=self.config.server.max_candidates,
                        k=min(20, self.config.server.max_candidates))  # fmt: skip

    def user_id(self, user: str) -> str:
        """The id ``user`` is stored under: mapped by each privacy plugin in order."""
        return self.plugins.privacy.user_id(user)

    def privacy_ingest(self, events: Sequence[Event]) -> list[Event]:
        """
        ``events`` as they may be stored: through each privacy plugin in order.

        Every way into the log goes through here after decoding and before the append:
        the socket's ``ingest``, the feeds (`FeedSink.decode`) and the impression records.
        """
        return self.plugins.privacy.ingest(events)

    def _append(self, events: Sequence[Any], *, positions: Any = None) -> Any:
        """The writer's sink: append + fold, then a snapshot if the interval has passed."""
        assert self.store is not None
        result = self.store.append(events, positions=positions)
        if self._refresh_wake is not None and self.ranking and self.ranking.ranker is not None:
            self._note_touched(events)
        interval = self.config.store.snapshot_interval_s
        when, offset = self._last_snapshot
        state_offset = self.store.state.offset
        if (interval and state_offset != offset and time.monotonic() - when >= interval
                and self.store.snapshot_if_possible() is not None):  # fmt: skip
            self._last_snapshot = (time.monotonic(), state_offset)
        return result

    def _storage_changed(self, error: StoreFullError | None) -> None:
        """
        The writer's storage condition began (``error``) or ended (None): log it once.

        On the writer thread. The log names the file and SQLite's reason, never an
        event; until the condition ends, ``ingest`` and ``forget`` answer
        ``storage_unavailable``, the feeds hold their messages unacknowledged,
        impressions are dropped (counted) and rank answers from the state in memory.
        """
        committer = self.committer
        if error is not None:
            _log.error("storage_unavailable", path=error.path, cause=error.cause,
                       problem=_storage_problem(error.cause),
                       effect="ingest refused (storage_unavailable), feeds paused, "
                              "ranking goes on from memory; retried with backoff",
                       hint="free space on the file system of [store].data_dir, or make "
                            "it writable again; the daemon resumes by itself")  # fmt: skip
            return
        assert committer is not None
        _log.info("storage_available", after_s=round(committer.last_unavailable_s, 3),
                  episode=committer.episodes, refused=committer.refused,
                  probes_failed=committer.probes_failed)  # fmt: skip

    def _snapshot_written(self, offset: int) -> None:
        """A snapshot covers ``offset`` (a retention sweep wrote it): restart the interval."""
        if offset != self._last_snapshot[1]:
            self._last_snapshot = (time.monotonic(), offset)

    def _note_touched(self, events: Sequence[Any]) -> None:
        """Queue the users whose interactions were just folded for the vector refresher."""
        index = self.store.state.user_index if self.store else {}
        rows = {index.get(e.user, -1) for e in events
                if getattr(e, "item", None) is not None and getattr(e, "user", None)}  # fmt: skip
        rows.discard(-1)
        if rows and self._loop is not None:
            with self._touched_lock:
                self._touched |= rows
            self._loop.call_soon_threadsafe(self._refresh_wake.set)  # type: ignore[union-attr]

    async def refresh_vectors(self) -> None:
        """
        Re-encode the vectors of users with new events, off the request path.

        Jobs of at most `_REFRESH_CHUNK` users go to the kernel thread one at a time,
        only while no rank waits for the batcher (a rank waits for one job at most),
        and after each job the refresher rests so that its jobs take at most
        ``[ranking].refresh_share`` of the time; users touched again meanwhile are
        coalesced. Why the share: when events touch users faster than the kernels can
        encode them (5,000 events/s over 10,000 users in the soak), a refresher that
        never rests keeps a core busy re-encoding vectors that the users' next events
        make stale before anyone ranks them, and the ranks that need an encode wait
        behind it: p50 37 ms, p99 up to 256 ms at 1,000 rank/s on 2 cores (bench/soak).
        """
        assert self.ranking is not None
        assert self.batcher is not None
        ranking, batcher, loop = self.ranking, self.batcher, asyncio.get_running_loop()
        rest = 1.0 / self.config.ranking.refresh_share - 1.0  # seconds resting per second busy
        self._loop = loop
        self._refresh_wake = wake = asyncio.Event()
        while True:
            await wake.wait()
            wake.clear()
            while True:
                await batcher.wait_idle()
                with self._touched_lock:
                    touched = self._touched
                    chunk = [touched.pop() for _ in range(min(_REFRESH_CHUNK, len(touched)))]
                if not chunk:
                    break
                started = time.perf_counter()
                try:
                    job = ranking.refresh_job(chunk)
                    if job is not None:
                        await loop.run_in_executor(self.kernel_thread, job.run)
                        ranking.store(job, refreshed=True)
                except Exception:  # noqa: BLE001 - a failed refresh leaves the encode to rank
                    _log.exception("vector_refresh_failed", users=len(chunk))
                if rest > 0.0:
                    await asyncio.sleep((time.perf_counter() - started) * rest)

    async def refresh_cold_start(self) -> None:
        """
        Keep the cold-start vectors current, off the request path.

        Every `_COLD_START_TICK_S` a thread of its own checks them and rebuilds them
        when the model, the state or its items changed (`Ranking.refresh_cold_start`):
        an item that arrives now has its vector within about a second. Not the kernel
        thread: a full build takes up to a tenth of a second on a large catalogue
        (`daemon._coldstart`), which encodes waiting behind it would add to answers.
        """
        assert self.ranking is not None
        ranking, loop = self.ranking, asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_COLD_START_TICK_S)
            if ranking.ranker is None:
                continue  # nothing to build for
            try:
                await loop.run_in_executor(self._cold_start_thread, ranking.refresh_cold_start)
            except Exception:  # noqa: BLE001 - stale vectors until the next tick; ranking goes on
                _log.exception("cold_start_refresh_failed")

    async def online_step(self) -> None:
        """
        ``[online]``: every ``interval_s``, one SGD step, then publish what it moved.

        The step moves the item biases (and, with ``embedding_learning_rate``, the
        item table). It learns from the examples the ranking handed over since the last one
        (`daemon.online`).

        On the cold-start thread, not the kernel thread: a step over many examples
        takes milliseconds that encodes would otherwise wait behind; the publishing
        too (a new item table is a copy), and there it cannot race a cold-start build.
        After a model swap the learner starts again from the new model.
        """
        assert self.ranking is not None
        ranking, loop = self.ranking, asyncio.get_running_loop()
        learner = self.online = OnlineLearner(self.config.online)
        while True:
            if ranking.ranker is not None and learner.model is not ranking.ranker:
                learner.attach(ranking)  # the first model, or a swapped-in one
            await asyncio.sleep(self.config.online.interval_s)
            if ranking.ranker is None or learner.model is not ranking.ranker:
                continue
            try:
                await loop.run_in_executor(self._cold_start_thread, learner.step_and_publish)
            except Exception:  # noqa: BLE001 - the biases stay as they were; ranking goes on
                _log.exception("online_step_failed")

    def start_training(self) -> None:
        """
        With no model: train one from the log in the background, then serve it.

        Ranking goes on by features meanwhile; the log says which is served, and why
        training was skipped when it is. The model file is written atomically, so a
        stop during training leaves either no file or a whole one.
        """
        r = self.config.ranking
        if self.model.ranker is not None or r.model_path is not None or not r.train_on_start:
            return
        out = self.config.store.data_dir / TRAINED_MODEL
        _log.info("model_absent", scoring="popularity, category interest and freshness",
                  training=str(out), max_seconds=r.train_max_seconds)  # fmt: skip
        thread = threading.Thread(target=self._train, args=(out,), name="daemon[train]",
                                  daemon=True)  # fmt: skip
        thread.start()
        self._training = thread

    def _train(self, out: Path) -> None:
        config = self.config
        try:
            result = train_from_log(config.store.data_dir / LOG_FILE, out,
                                    max_seconds=config.ranking.train_max_seconds)  # fmt: skip
            if result.path is None:
                _log.info("model_training_skipped", reason=result.reason,
                          scoring="popularity, category interest and freshness")  # fmt: skip
                return
            assert self.store is not None
            model = load_served_model(config, self.store.state)
        except ModelRefusedError as error:  # e.g. a diverged run: NaN parameters
            _log.error("model_refused", reason=error.reason, error=str(error), at="training")
            return
        except Exception:  # noqa: BLE001 - training is best effort; ranking goes on by features
            _log.exception("model_training_failed")
            return
        assert self.ranking is not None
        self.ranking.replace_model(model.ranker, model.vocabulary, feature_weights(config))
        self.model = model
        _log.info("model_trained", path=str(out), items=result.items, users=result.users,
                  epochs=result.epochs, seconds=round(result.seconds, 1))  # fmt: skip

    def _register_gauges(self) -> None:
        store, committer, ranking = self.store, self.committer, self.ranking
        assert store is not None
        assert committer is not None
        assert ranking is not None
        gauges: dict[str, tuple[str, Any]] = {
            "rerankd_writer_pending": ("Append requests waiting for the writer",
                                       lambda: committer.pending),
            "rerankd_log_offset": ("Last log offset folded into the state",
                                   lambda: store.state.offset),
            "rerankd_users": ("Users in the state", lambda: len(store.state.user_index)),
            "rerankd_items": ("Items in the state", lambda: store.state.n_items),
            "rerankd_snapshot_age_seconds": ("Seconds since the last snapshot",
                                             lambda: time.monotonic() - self._last_snapshot[0]),
            "rerankd_vector_cache_hits": ("User vectors served from cache",
                                          lambda: ranking.cache_hits),
            "rerankd_vector_cache_misses": ("User vectors encoded on the request path",
                                            lambda: ranking.cache_misses),
            "rerankd_vectors_refreshed": ("User vectors re-encoded in the background",
                                          lambda: ranking.refreshed),
            "rerankd_compiled_kernels": ("Compiled kernel executables", self._compile_count),
            "rerankd_online_examples": ("Examples the online learning step has used",
                                        lambda: self.online.examples if self.online else 0),
            "rerankd_connections": ("Open socket connections",
                                    lambda: self.server.connections if self.server else 0),
            "rerankd_storage_available": (("1 while the event log can be written, 0 while "
                                          "it cannot (disk full, read-only, I/O error)"),
                                          lambda: int(committer.storage_available)),
            "rerankd_storage_unavailable_seconds": (
                "How long the current storage condition has lasted (0: none)",
                lambda: (0.0 if committer.unavailable_since is None
                         else time.monotonic() - committer.unavailable_since)),
            "rerankd_storage_episodes": ("Storage conditions since the start",
                                         lambda: committer.episodes),
        }  # fmt: skip
        for name, (doc, read) in gauges.items():
            self.metrics.gauge(name, doc, read)

    def _compile_count(self) -> int:
        ranker = self.ranking.ranker if self.ranking else None
        return ranker.compile_count if ranker else 0

    async def reload(self) -> None:
        """
        SIGHUP: re-read the config file, then swap in the model and weights it names.

        The state, the log and the socket stay as they are (changing [store] or
        [server] needs a restart; the log says so). A config or model that fails to
        load leaves everything as it was.
        """
        source = self.config.source
        if source == DEFAULTS_SOURCE:
            _log.info("reload_skipped", reason="running on the embedded default, no file")
            return
        try:
            config = await asyncio.to_thread(load_config, source)
            # in the data directory in use: a new [store] waits for a restart
            running = dataclasses.replace(config, store=self.config.store)
            plugins = await asyncio.to_thread(load_plugins, running)
        except (DaemonError, OSError, ValueError) as error:
            _log.error("reload_failed", error=str(error))
            return
        if plugins.user_id_probe != self.plugins.user_id_probe:
            # the state, the log and the tombstones are keyed by the current pseudonyms
            _log.error("reload_refused", reason="the new [plugins] would map user ids "
                       "otherwise (another pseudonymization key or hex_chars, or pseudonymize "
                       "switched on or off); nothing was changed. Re-keying is an offline "
                       "replay of the log: see README, Key rotation")  # fmt: skip
            return
        assert self.store is not None
        assert self.ranking is not None
        try:  # loaded and checked in a worker thread; nothing is swapped before it passes
            model = await asyncio.to_thread(load_served_model, config, self.store.state)
        except ModelRefusedError as error:
            _log.error("model_refused", reason=error.reason, error=str(error), at="reload")
            return
        except (DaemonError, OSError, ValueError) as error:
            _log.error("reload_failed", error=str(error))
            return
        for section in ("store", "server", "fold", "limits", "online"):
            if getattr(config, section) != getattr(self.config, section):
                _log.warning("reload_needs_restart", section=section)
        self.ranking.replace_model(model.ranker, model.vocabulary, feature_weights(config))
        self.ranking.cold_start = config.ranking.cold_start
        self.config, self.model, self.plugins = config, model, plugins
        if self.retention is not None:
            self.retention.wake()  # sweep under the new plugins' retention, if any, now
        self.ranking.policies = plugins.policies  # read once per answer: a plain swap
        await asyncio.to_thread(self._warm_policies)
        _log_plugins(plugins)
        _log.info("reloaded", model=model.source, model_created_at=model.created_at)

    def close(self) -> None:
        """Flush the writer, snapshot and close the log (idempotent)."""
        self._flush_impressions()
        if self.committer is not None:
            self.committer.close()
            self.committer = None
        if self.store is not None:
            self.store.close()
        self.kernel_thread.shutdown(wait=True)
        self._cold_start_thread.shutdown(wait=True)
        self.metrics.close()

    # -------------------------------------------------------------- handlers

    async def handle(self, request: Request) -> dict[str, Any]:
        """
        Route one request to its handler, counting it and its errors.

        The request id and op are bound to the log context without being unbound:
        the server runs each request in its own task, whose context copy ends with it.
        """
        op = request.op if isinstance(request, Rank) else type(request).__struct_config__.tag
        self._op_counter(op).inc()
        structlog.contextvars.bind_contextvars(request_id=request.id, op=op)
        try:
            return await self._route(request)
        except ProtocolError as error:
            self.metrics.errors.labels(code=error.code).inc()
            raise

    def _op_counter(self, op: str) -> Any:
        counter = self._op_counters.get(op)
        if counter is None:
            counter = self._op_counters[op] = self.metrics.requests.labels(op=op)
        return counter

    async def _route(self, request: Request) -> dict[str, Any]:  # noqa: PLR0911 - one return per op
        if isinstance(request, Rank):
            return await self._rank(request)
        if isinstance(request, Ingest):
            return await self._ingest(request.events)
        if isinstance(request, UserInfo):
            return await self._user(request.user)
        if isinstance(request, Forget):
            return await self._forget(request.user)
        if isinstance(request, Health):
            return {"status": "ok", "model": self.model.ranker is not None}
        if isinstance(request, Stats):
            return self.stats()
        if isinstance(request, Export):
            return await self._export(request)
        msg = f"op: {type(request).__name__} has no handler"
        raise ProtocolError("unknown_op", msg)

    async def _rank(self, request: Rank) -> dict[str, Any]:
        assert self.batcher is not None
        started = time.perf_counter()
        result = await self.batcher.rank(request)
        self.metrics.observe_rank(time.perf_counter() - started)
        return self._rank_body(request, result)

    def rank_now(self, requests: Sequence[Rank]) -> list[dict[str, Any] | ProtocolError] | None:
        """
        Rank a turn's requests together, at once, on the event loop (see `Server`).

        Declines (None) when a user's vector must be encoded or a batch is already
        running: those go through `handle` and the batcher instead.
        """
        assert self.batcher is not None
        assert self.ranking is not None
        if self.batcher.busy or self.ranking.needs_encode(requests):
            return None
        started = time.perf_counter()
        results: list[RankedList] = []
        size = self.batcher.max_batch
        for start in range(0, len(requests), size):
            chunk = requests[start : start + size]
            results.extend(self.ranking.rank_batch(chunk))
            self.metrics.batch_size.observe(len(chunk))
        elapsed = time.perf_counter() - started
        out: list[dict[str, Any] | ProtocolError] = []
        for request, result in zip(requests, results, strict=True):
            self._op_counter(request.op).inc()
            self.metrics.observe_rank(elapsed)
            out.append(self._rank_body(request, result))
        return out

    def _rank_body(self, request: Rank, result: RankedList) -> dict[str, Any]:
        ranking_id = self._ranking_ids()
        if self.config.ranking.record_impressions and result.items:
            # made from the id the caller sent: the privacy plugins map it on the way in
            user = request.user if request.given_user is None else request.given_user
            self._record_impression(user, result.items, ranking_id, result.record)
        body: dict[str, Any] = {"ranking_id": ranking_id, "items": result.items,
                                "scores": result.scores, "source": result.source}  # fmt: skip
        if result.explain is not None:
            body["explain"] = result.explain
        return body

    def _record_impression(self, user: str, items: list[str], ranking_id: str,
                           record: Mapping[str, Any]) -> None:  # fmt: skip
        """
        Queue what was shown for the log, without waiting: the answer does not depend on it.

        Impressions are flushed together every ``_IMPRESSION_FLUSH_S`` by
        `flush_impressions` (one append for many answers): one append per answer
        costs the writer a transaction each and, on 2 cores, took about 1 ms off
        every answer's latency. The interval is short (5 ms) because folding a group
        holds the GIL for about 13 µs an impression: groups of 50 ms stalled the loop
        for over a millisecond and tripled the p99.

        ``user`` is the caller's id: the impression goes through the privacy plugins
        when it is flushed, like every event on its way to the log. ``record`` is what
        the ranking policies asked to keep with it (an experiment's arm), stored as the
        impression's ``context``.
        """
        shown = ItemsShown(id=ranking_id, ts=time.time(), user=user, items=items[:256],
                           ranking_id=ranking_id, context=dict(record) if record else None)
        if len(self._impressions) < _MAX_PENDING_IMPRESSIONS:
            self._impressions.append(shown)
            self._impressions_waiting.set()
        else:
            self.metrics.impressions_dropped.inc()  # overload: attribution yields first

    async def flush_impressions(self) -> None:
        """
        Append queued impressions as one request, ``_IMPRESSION_FLUSH_S`` after the first.

        An idle daemon does not wake up for them.
        """
        while True:
            await self._impressions_waiting.wait()
            await asyncio.sleep(_IMPRESSION_FLUSH_S)
            self._impressions_waiting.clear()
            self._flush_impressions()

    def _flush_impressions(self) -> None:
        if not self._impressions or self.committer is None:
            return
        batch, self._impressions = self._impressions, []
        try:
            self.committer.submit(self.privacy_ingest(batch))
        except (BackpressureError, StoreFullError):  # busy, or storage unavailable
            self.metrics.impressions_dropped.inc(len(batch))
        except Exception:  # noqa: BLE001 - a privacy plugin's bug: drop, never store unmapped
            _log.exception("impressions_privacy_failed", impressions=len(batch))
            self.metrics.impressions_dropped.inc(len(batch))

    async def _ingest(self, raw: Any) -> dict[str, Any]:
        assert self.committer is not None
        events, dropped, rejections = await asyncio.to_thread(self._decode, bytes(raw))
        rejected = [{"index": r.index, "error": str(r.error)} for r in rejections]
        status: list[str] = []
        if events:
            status = (await self._submit(events)).status  # busy: nothing counted
        outcome = {
            "accepted": status.count("accepted"),
            "duplicates": status.count("duplicate"),
            # events of a forgotten user: kept out of the log by the tombstone
            "erased": status.count("erased"),
        }
        for name, n in (*outcome.items(), ("rejected", len(rejected)), ("dropped", dropped)):
            self.metrics.events.labels(outcome=name).inc(n)
        if dropped:  # a privacy plugin kept some events out (none of the built-ins does)
            outcome["dropped"] = dropped
        return {**outcome, "rejected": rejected}

    def _decode(self, raw: bytes) -> tuple[list[Event], int, list[Rejection]]:
        """Decode, then the privacy plugins: (events to store, how many dropped, rejections)."""
        decoded = self.decoder.decode(raw)
        events = self.privacy_ingest(decoded.events) if decoded.events else []
        return events, len(decoded.events) - len(events), decoded.rejected

    async def _submit(self, events: Sequence[Any]) -> Any:
        """
        Append ``events`` durably; the writer's refusals become protocol errors.

        ``busy`` when the writer's queue is full; ``storage_unavailable`` when the log
        cannot be written (disk full, read-only, I/O error) or a storage condition
        holds: nothing of the request was stored (the group failed as a whole and was
        not folded), so the caller retries after ``retry_after_ms``.
        """
        committer = self.committer
        assert committer is not None
        try:
            return await asyncio.wrap_future(committer.submit(events))
        except BackpressureError as error:
            raise ProtocolError(
                "busy", "the event log's writer is behind",
                retry_after_ms=max(1, round(error.retry_after_s * 1000)),
            ) from None  # fmt: skip
        except StoreFullError as error:
            raise ProtocolError(
                "storage_unavailable",
                f"the event log cannot be written: {_storage_problem(error.cause)}; "
                "nothing was stored, retry after retry_after_ms",
                retry_after_ms=max(1, round(committer.retry_after_s() * 1000)),
            ) from None  # fmt: skip

    async def _user(self, user: str) -> dict[str, Any]:
        assert self.store is not None
        store = self.store
        loop = asyncio.get_running_loop()
        view = await loop.run_in_executor(self.kernel_thread, store.state.user_view, user)
        if view is None:
            raise ProtocolError("not_found", "user: unknown")
        return {"user": view}

    async def _forget(self, user: str) -> dict[str, Any]:
        """
        Erase ``user``, an id already mapped by the request decoder (`Service.user_id`).

        The forget event is a command carried out by the store, not stored: it does not
        go through the privacy plugins again (which would map the id twice).
        """
        event = UserForgotten(id=f"forget-{uuid.uuid4().hex}", ts=time.time(), user=user)
        try:
            await self._submit([event])
        except OSError as error:  # the log forgot the user; rewriting the snapshots failed
            raise ProtocolError(
                "storage_unavailable",
                f"the user is erased from the log, but the snapshots could not be rewritten "
                f"({error.strerror or type(error).__name__}); retry forget",
                retry_after_ms=1000,
            ) from None  # fmt: skip
        assert self.ranking is not None
        self.ranking.forget_vectors()
        return {}

    async def _export(self, request: Export) -> dict[str, Any]:
        """
        A page of per-item aggregates (`daemon._export`), as the privacy plugins let it out.

        Both run on the kernel thread: a page of 100,000 items, and ``noise``'s draws for
        it, take milliseconds the loop does not wait for.
        """
        assert self.store is not None
        assert self.ranking is not None
        store, popularity, privacy = self.store, self.ranking.popularity, self.plugins.privacy

        def page() -> dict[str, Any]:
            return privacy.export(item_aggregates(store.state, popularity,
                                                  offset=request.offset, limit=request.limit))

        return await asyncio.get_running_loop().run_in_executor(self.kernel_thread, page)

    def stats(self) -> dict[str, Any]:
        """
        Counters, queue depths and cache figures for the ``stats`` op.

        As the privacy plugins' ``export`` lets them out.
        """
        assert self.store is not None
        assert self.committer is not None
        assert self.ranking is not None
        assert self.batcher is not None
        state, m = self.store.state, self.metrics
        return self.plugins.privacy.export({
            "uptime_s": round(time.time() - self.started, 3),
            "events": self._event_counts() | {"log_offset": state.offset,
                                               "indexed_ids": self.store.log.indexed_ids},
            "users": len(state.user_index),
            "items": state.n_items,
            "writer_pending": self.committer.pending,
            "storage": self._storage_stats(),
            "queues": {  # depths right now: a soak watches them for unbounded growth
                "rank_batcher": self.batcher.depth,
                "requests_in_flight": self.server.in_flight if self.server else 0,
                "impressions": len(self._impressions),
                "vector_refresh": len(self._touched),
            },
            "rank_batches": m.total("rerankd_rank_batch_size_count"),
            "rank_batched_requests": m.total("rerankd_rank_batch_size_sum"),
            "vector_cache": {
                "hits": self.ranking.cache_hits,
                "misses": self.ranking.cache_misses,
                "refreshed": self.ranking.refreshed,
            },
            "rank_latency_ms": self.metrics.rank_percentiles_ms(),
            "connections": self.server.connections if self.server else 0,
            "snapshot_age_s": round(time.monotonic() - self._last_snapshot[0], 3),
            "retention": self.retention.last if self.retention else None,
            "model": self.model.source,
            "model_created_at": self.model.created_at,
            "model_members": (self.model.ranker.config.members
                              if self.model.ranker is not None else None),
            "warmup_s": round(self.model.warmup_s, 3),
            "compile_count": self._compile_count(),
            "online": ({"examples": self.online.examples, "steps": self.online.steps,
                        "dropped": self.online.dropped}
                       if self.online is not None else None),
            "feeds": {feed.name: feed.stats() | {"storage_paused": self._feed_paused(feed.name)}
                      for feed in self.feeds},
            "plugins": {"privacy": self.plugins.privacy.names,
                        "policies": [p.name for p in self.plugins.policies]},
        })

    def _feed_paused(self, name: str) -> bool:
        """Whether feed ``name`` holds a batch unacknowledged, waiting for storage."""
        return self.feed_sink is not None and name in self.feed_sink.paused

    def _storage_stats(self) -> dict[str, Any]:
        """The writer's storage condition: whether the log can be written now, and why not."""
        committer = self.committer
        assert committer is not None
        error, since = committer.unavailable, committer.unavailable_since
        return {
            "available": error is None,
            "cause": None if error is None else error.cause,
            "problem": None if error is None else _storage_problem(error.cause),
            "unavailable_s": 0.0 if since is None else round(time.monotonic() - since, 3),
            "episodes": committer.episodes,
            "refused": committer.refused,
            "probes_failed": committer.probes_failed,
        }

    def _event_counts(self) -> dict[str, int]:
        """What happened to ingested events and rank requests, from the Prometheus counters."""
        m = self.metrics
        outcomes = ("accepted", "duplicates", "erased", "rejected", "dropped")
        counts = {o: m.total("rerankd_events_total", outcome=o) for o in outcomes}
        return counts | {
            "ranked": sum(m.total("rerankd_requests_total", op=op) for op in ("rank", "explain")),
            "busy": m.total("rerankd_errors_total", code="busy"),
            "impressions_dropped": m.total("rerankd_impressions_dropped_total"),
        }


def _storage_problem(cause: str) -> str:
    """
    What a storage error's cause (SQLite's error name) means, in words.

    SQLite reports a full disk as SQLITE_FULL; a file system that turned read-only
    under an open log, like a failing disk, as an I/O error (its errno is not
    exposed to Python); a file it cannot reopen as SQLITE_CANTOPEN or SQLITE_READONLY.
    """
    if cause.startswith("SQLITE_FULL"):
        return f"disk full ({cause})"
    if cause.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_CANTOPEN")):
        return f"the file system or the log file is read-only or cannot be opened ({cause})"
    return f"I/O error: the file system is read-only or failing ({cause})"


def _log_plugins(plugins: Plugins) -> None:
    """Say which plugins run, in order."""
    policies = [p.name for p in plugins.policies]
    _log.info("plugins_loaded", privacy=plugins.privacy.names, policies=policies)


def _make_feeds(config: Config, sink: FeedSink) -> list[Any]:
    """The configured feeds (imported only when configured: they pull in their clients)."""
    feeds: list[Any] = []
    if config.mqtt.url:
        from daemon.feeds.mqtt import MqttFeed  # noqa: PLC0415

        feeds.append(MqttFeed(config.mqtt, sink))
    if config.kafka.bootstrap:
        from daemon.feeds.kafka import KafkaFeed  # noqa: PLC0415

        feeds.append(KafkaFeed(config.kafka, sink))
    return feeds


# ------------------------------------------------------------------- lifecycle


def run(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status (0 on a clean stop)."""
    _log.info("malloc_tuned", mmap_threshold=MMAP_THRESHOLD, outcome=tune_malloc())
    try:
        uvloop = __import__("uvloop")
    except ImportError:
        return asyncio.run(_main(config))
    return uvloop.run(_main(config))  # type: ignore[no-any-return]


async def _main(config: Config) -> int:
    shutdown = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, shutdown.set)
    service = Service(config)
    reloads: set[asyncio.Task[None]] = set()

    def on_hangup() -> None:
        task = asyncio.create_task(service.reload(), name="daemon[main].reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await asyncio.to_thread(service.open)
    sock = inherited_socket()
    socket_path: Path | None = None
    if sock is None:
        socket_path = config.server.socket_path
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        sock = bind_unix_socket(socket_path, mode=config.server.socket_mode)
    server = Server(
        service.handle,
        config.server,
        RequestDecoder(
            max_candidates=config.server.max_candidates, max_id_bytes=config.limits.max_id_bytes,
            user_id=service.user_id,
        ),
        rank_now=service.rank_now,
    )
    service.server = server
    try:
        await server.start(sock)
        _settle_garbage_collector()
        notify("READY=1", f"STATUS=serving on {socket_path or 'an inherited socket'}")
        _log.info("ready", socket=str(socket_path) if socket_path else "inherited",
                  model=service.model.ranker is not None, pid=os.getpid())  # fmt: skip
        service.start_training()
        await _serve(service, server, shutdown)
    finally:
        notify("STOPPING=1")
        try:
            await asyncio.to_thread(service.close)
        finally:
            cancel_dump()
        if socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                socket_path.unlink()
        _log.info("stopped")
    return 0


#: Allocations between two young-generation collections (CPython's default: 700).
GC_YOUNG_THRESHOLD: Final = 20_000


def _settle_garbage_collector() -> None:
    """
    Keep the cyclic garbage collector off the serving path's back.

    Start-up leaves a few hundred thousand long-lived objects (modules, JAX, the model,
    the state), and every full collection walks them all: about 0.1 s on the
    development VM, a pause that lands on whatever request or feed batch is running.
    ``gc.freeze`` moves them out of the collector's sight (they are still freed by
    reference counting), and a larger young-generation threshold makes the collections
    of what the feeds and requests allocate rarer.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def _serve(service: Service, server: Server, shutdown: asyncio.Event) -> None:
    assert service.batcher is not None
    tasks: list[asyncio.Task[Any]] = []
    hurrying: set[asyncio.Task[None]] = set()
    try:
        async with asyncio.TaskGroup() as tg:

            def start(coro: Any, name: str) -> None:
                tasks.append(tg.create_task(coro, name=name))

            start(service.batcher.run(), "daemon[ranking].batcher")
            start(_watchdog(), "daemon[systemd].watchdog")
            start(service.flush_impressions(), "daemon[ranking].impressions")
            if service.retention is not None:
                start(service.retention.run(), "daemon[store].retention")
            for feed in service.feeds:
                start(feed.run(), f"daemon[feeds].{feed.name}")
            if service.config.ranking.refresh_vectors:
                start(service.refresh_vectors(), "daemon[ranking].refresher")
            start(service.refresh_cold_start(), "daemon[ranking].cold_start")
            if service.config.online.enabled:
                start(service.online_step(), "daemon[ranking].online")
            start(_stop_on(shutdown, server, service.config.server.graceful_timeout_s,
                           tasks, hurrying), "daemon[main].shutdown")  # fmt: skip
    except* ShutdownRequested:
        pass
    finally:
        for task in hurrying:
            task.cancel()


async def _stop_on(
    shutdown: asyncio.Event, server: Server, graceful_timeout_s: float,
    tasks: Sequence[asyncio.Task[Any]], hurrying: set[asyncio.Task[None]],
) -> None:  # fmt: skip
    await shutdown.wait()
    dump_threads_later()  # a stop that a blocked thread holds up leaves a trace
    notify("STOPPING=1")
    _log.info("stopping", connections=server.connections)
    await server.stop(graceful_timeout_s=graceful_timeout_s)
    # the TaskGroup cancels the tasks now; one that misses it is cancelled again
    hurrying.add(asyncio.create_task(hurry(tasks), name="daemon[main].hurry"))
    raise ShutdownRequested


async def _watchdog() -> None:
    """Ping systemd's watchdog from the event loop, so a stuck loop gets restarted."""
    interval = watchdog_interval_s()
    if interval is None:
        return
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)
