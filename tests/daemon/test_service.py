"""
The daemon as a real process on a temporary directory, over its real Unix socket,
with a real NOTIFY_SOCKET bound by the test.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemons import poll

from daemon.client import Client, RequestFailedError

NOW = time.time()


def _event(n: int, kind: str = "click", user: str = "u-1", item: str = "i-1") -> dict[str, Any]:
    return {"id": f"e-{n}", "type": kind, "user": user, "item": item, "ts": NOW - 60 + n * 0.001}


def test_ingest_changes_rank_and_survives_restart(start: Any) -> None:
    """READY → ingest → rank reflects it → SIGTERM exits 0 → a restart has the same state."""
    daemon = start()
    with daemon.client() as client:
        assert client.request("health")["status"] == "ok"
        before = client.request("rank", user="u-1", candidates=["a", "b", "c"])
        assert before["items"] == ["a", "b", "c"]  # nothing known: the given order
        events = [_event(k, "purchase", user=f"u-{k}", item="c") for k in range(5)]
        ack = client.request("ingest", events=events)
        assert (ack["accepted"], ack["duplicates"], ack["rejected"]) == (5, 0, [])
        after = client.request("rank", user="u-1", candidates=["a", "b", "c"])
        assert after["items"][0] == "c"
        assert after["ranking_id"].startswith("r-")
        view = client.request("user", user="u-1")["user"]
    assert daemon.stop() == 0
    assert "STOPPING=1" in daemon.received()
    again = start()
    with again.client() as client:
        assert client.request("user", user="u-1")["user"]["recent"] == view["recent"]
        assert client.request("rank", user="u-9", candidates=["a", "c"])["items"][0] == "c"


def test_read_your_writes_on_one_connection(start: Any) -> None:
    """An event acknowledged on a connection is reflected in the next rank on it."""
    daemon = start()
    with daemon.client() as client:
        for n, item in enumerate(["x", "y", "x", "z", "y", "y"]):
            client.request("ingest", events=[_event(n, "purchase", user=f"v-{n}", item=item)])
            counts = {"x": 0, "y": 0, "z": 0}
            for m, it in enumerate(["x", "y", "x", "z", "y", "y"][: n + 1]):
                counts[it] += 1 if m <= n else 0
            best = max(counts.values())
            ranked = client.request("rank", user="w", candidates=["x", "y", "z"])["items"]
            assert counts[ranked[0]] == best


def test_socket_activation(start: Any, tmp_path: Path) -> None:
    """With LISTEN_FDS the daemon serves the inherited socket and binds none itself."""
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    daemon = start(listen_fd=listener.fileno())
    listener.close()
    with Client(path) as client:
        assert client.request("health")["ok"] is True
    assert not daemon.socket_path.exists()


def test_pipelining_answers_out_of_order(start: Any) -> None:
    """Pipelined requests are all answered, matched by id, the quick one first."""
    daemon = start()
    with daemon.client() as client:
        big = [_event(n, user=f"p-{n % 50}", item=f"i-{n % 300}") for n in range(4000)]
        slow = client.send("ingest", events=big)
        quick = client.send("health")
        answers = [client.receive(), client.receive()]
    assert [a["id"] for a in answers] == [quick, slow]
    assert answers[1]["accepted"] == 4000


def test_limits_answered_while_others_are_served(start: Any) -> None:
    """Each limit breach gets its own error code; a second client is served meanwhile."""
    daemon = start("max_line_bytes = 2048\nmax_candidates = 10\nidle_timeout_s = 2.0\n")
    with daemon.client() as other, daemon.client() as bad:
        bad.send("rank", user="u", candidates=[f"c{k}" for k in range(11)])
        assert bad.receive()["error"]["code"] == "too_many_candidates"
        assert other.request("health")["ok"]
        bad.send_raw(b'{"id": 5, "op": "rank", "user": 7}\n')
        error = bad.receive()
        assert (error["id"], error["error"]["code"]) == (5, "bad_request")
        assert error["error"]["message"].startswith("user:")
        bad.send_raw(b"{not json\n")
        assert bad.receive()["error"]["code"] == "bad_request"
        bad.send_raw(b'{"id": 6, "op": "drop_tables"}\n')
        assert bad.receive()["error"]["code"] == "unknown_op"
        bad.send_raw(b'{"id": 7, "op": "health", "pad": "' + b"x" * 4096 + b'"}\n')
        assert bad.receive()["error"]["code"] == "line_too_long"
        with pytest.raises(ConnectionError):
            bad.receive()
        assert other.request("health")["ok"]
    with daemon.client() as idle:
        assert idle.receive()["error"]["code"] == "idle_timeout"


def test_connection_limit(start: Any) -> None:
    """Past max_connections a new connection is refused with too_many_connections."""
    daemon = start("max_connections = 2\n")
    with daemon.client() as a, daemon.client() as b:
        assert a.request("health")["ok"]
        assert b.request("health")["ok"]
        with daemon.client() as c:
            assert c.receive()["error"]["code"] == "too_many_connections"
        assert a.request("health")["ok"]


_AS_NOBODY = (
    "import os, socket; os.setgid(65534); os.setuid(65534); "
    "s = socket.socket(socket.AF_UNIX); s.connect(os.environ['SOCK']); "
    "print(s.makefile('rb').readline().decode())"
)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_peer_with_other_uid_is_refused(start: Any) -> None:
    """A peer whose uid is not allowed is answered forbidden (SO_PEERCRED), others served."""
    with tempfile.TemporaryDirectory() as public:  # pytest's tmp_path is private to root
        Path(public).chmod(0o755)
        daemon = start("socket_mode = 0o666\n", socket_dir=Path(public))
        out = subprocess.run(
            [sys.executable, "-c", _AS_NOBODY], env={"SOCK": str(daemon.socket_path)},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert '"code":"forbidden"' in out.stdout
        with daemon.client() as client:
            assert client.request("health")["ok"]


def test_sigkill_during_ingest_loses_no_acknowledged_event(start: Any, tmp_path: Path) -> None:
    """Events acknowledged before a kill -9 are all in the log after it, exactly once."""
    daemon = start()
    acked: list[str] = []
    with daemon.client() as client:
        for n in range(400):
            client.request("ingest", events=[_event(n, user=f"k-{n % 7}")])
            acked.append(f"e-{n}")
            if n == 250:
                daemon.proc.send_signal(signal.SIGKILL)
                break
    daemon.proc.wait(timeout=30)
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "events.db")) as db:
        ids = [row[0] for row in db.execute("SELECT id FROM events")]
    assert sorted(set(ids) & set(acked)) == sorted(acked)
    assert len(ids) == len(set(ids))
    again = start()
    with again.client() as client:
        stats = client.request("stats")
        assert stats["events"]["log_offset"] >= len(acked)


def test_stats_count_the_id_index(start: Any) -> None:
    """stats.events.indexed_ids: one entry per logged event; a duplicate adds none."""
    daemon = start()
    with daemon.client() as client:
        before = client.request("stats")["events"]["indexed_ids"]
        client.request("ingest", events=[_event(n, user="ix") for n in range(5)])
        client.request("ingest", events=[_event(2, user="ix")])  # already logged
        after = client.request("stats")["events"]["indexed_ids"]
    assert 5 == after - before


def test_a_burst_of_clients_waits_in_the_backlog(start: Any) -> None:
    """
    300 clients connecting while the daemon cannot accept (stopped) are all held in the
    listen backlog, then served: asyncio's create_unix_server used to listen() again
    with a backlog of 100, so the 102nd connect() failed with EAGAIN.
    """
    daemon = start()
    socks: list[socket.socket] = []
    daemon.proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setblocking(False)  # noqa: FBT003 - EAGAIN rather than a wait
            sock.connect(str(daemon.socket_path))
    finally:
        daemon.proc.send_signal(signal.SIGCONT)
    try:
        last = socks[-1]
        last.setblocking(True)  # noqa: FBT003
        last.settimeout(30)
        last.sendall(b'{"id":1,"op":"health"}\n')
        assert b'"ok":true' in last.recv(65536)
    finally:
        for sock in socks:
            sock.close()


def test_forget_erases_the_user(start: Any) -> None:
    """forget removes the user's state; user then answers not_found."""
    daemon = start()
    with daemon.client() as client:
        client.request("ingest", events=[_event(1, user="gone")])
        assert client.request("user", user="gone")["user"]["events"] == 1
        client.request("forget", user="gone")
        with pytest.raises(RequestFailedError) as error:
            client.request("user", user="gone")
        assert error.value.code == "not_found"


# ------------------------------------------------------------------------ with a model

_V, _L = 20, 8


@pytest.fixture(name="model_file", scope="module")
def fixture_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained on cyclic sequences m1 -> m2 -> ... -> m20 -> m1."""
    import jax  # noqa: PLC0415 - only these tests need JAX in the test process

    from kernels.modelfile import save_model  # noqa: PLC0415
    from kernels.sasrec import SasrecConfig, init_params  # noqa: PLC0415
    from kernels.train import default_optimizer, fit  # noqa: PLC0415

    config = SasrecConfig(num_items=_V, max_len=_L, dim=16, num_blocks=1, dropout=0.0)
    rows = [[(s + j) % _V + 1 for j in range(n)] for s in range(_V) for n in range(2, _L + 2)]
    inputs = np.zeros((len(rows), _L), np.int32)
    targets = np.zeros((len(rows), _L), np.int32)
    for r, seq in enumerate(rows):
        inputs[r, -(len(seq) - 1) :] = seq[:-1]
        targets[r, -(len(seq) - 1) :] = seq[1:]
    epochs = itertools.count()
    params, _ = fit(
        init_params(jax.random.key(0), config), config, inputs, targets,
        val_inputs=inputs[:32], val_targets=targets[:32, -1], epochs=40, batch_size=64,
        seed=0, optimizer=default_optimizer(learning_rate=1e-2), patience=40, progress=False,
        # every epoch counts as the best so far: the last one's parameters come back
        # (validation excludes the seen items, so it peaks while m5 still scores close to m6)
        evaluator=lambda _p, _x, _y: (float(next(epochs)), 0.0),
    )  # fmt: skip
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_model(path, params, config, vocabulary=[f"m{i}" for i in range(1, _V + 1)])
    return path


def _model_config(path: Path) -> str:
    return (
        "max_candidates = 32\n[ranking]\n"
        f'model_path = "{path}"\nmax_batch = 4\nbatch_buckets = [1, 4]\n'
        "candidate_buckets = [8, 32]\n"
    )


def test_model_ranks_the_next_item_of_the_sequence(start: Any, model_file: Path) -> None:
    """With a model, a user who viewed m3, m4, m5 gets m6 first; no compile after start."""
    daemon = start(_model_config(model_file))
    with daemon.client() as client:
        assert client.request("health")["model"] is True
        history = [_event(n, "view", user="seq", item=f"m{n}") for n in (3, 4, 5)]
        client.request("ingest", events=history)
        candidates = ["m1", "m9", "m6", "m12", "m15", "unknown-item"]
        ranked = client.request("explain", user="seq", candidates=candidates)
        assert ranked["items"][0] == "m6"
        assert ranked["source"] == "model"
        explain = dict(zip(ranked["items"], ranked["explain"], strict=True))
        assert explain["unknown-item"]["known_to_model"] is False
        assert explain["m6"]["model"] > explain["m1"]["model"]
        compiled = client.request("stats")["compile_count"]
        # one encoder per batch bucket; on a CPU the daemon scores with its own loops
        assert compiled == 2
        for n in range(30):
            client.request("rank", user=f"x-{n % 3}", candidates=candidates[: 1 + n % 6])
        assert client.request("stats")["compile_count"] == compiled


def test_sighup_reloads_model_and_keeps_serving_on_a_bad_config(
    start: Any, model_file: Path
) -> None:
    """SIGHUP swaps in the model the config now names; a broken config changes nothing."""
    daemon = start()
    with daemon.client() as client:
        client.request("ingest", events=[_event(n, "view", user="h", item=f"m{n}") for n in (7, 8)])
        assert client.request("rank", user="h", candidates=["m9", "m2"])["source"] == "features"
        text = daemon.config.read_text() + _model_config(model_file)  # [server] continues
        daemon.config.write_text(text)
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while not client.request("health")["model"]:
            assert time.monotonic() < deadline, "the model was not loaded after SIGHUP"
            time.sleep(0.2)
        ranked = client.request("rank", user="h", candidates=["m2", "m9", "m4"])
        assert (ranked["source"], ranked["items"][0]) == ("model", "m9")
        daemon.config.write_text(text + "\n[nonsense]\n")
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reload_failed" not in (daemon.tmp / "daemon.log").read_text():
            assert time.monotonic() < deadline, "no reload_failed in the log"
            time.sleep(0.2)
        assert client.request("rank", user="h", candidates=["m2", "m9"])["source"] == "model"


def test_answers_are_logged_as_impressions(start: Any, tmp_path: Path) -> None:
    """Each rank answer is appended as an impression event carrying its ranking_id."""
    daemon = start()
    with daemon.client() as client:
        first = client.request("rank", user="imp", candidates=["a", "b", "c"], k=2)
        second = client.request("rank", user="imp", candidates=["c", "d"])
        deadline = time.monotonic() + 10
        while _impressions_of(client, "imp") < 2:
            assert time.monotonic() < deadline, "the impressions never reached the state"
            time.sleep(0.02)
    assert daemon.stop() == 0
    with contextlib.closing(sqlite3.connect(tmp_path / "data" / "events.db")) as db:
        ids = {row[0] for row in db.execute("SELECT id FROM events")}
    assert {first["ranking_id"], second["ranking_id"]} <= ids


def _impressions_of(client: Client, user: str) -> int:
    try:
        return client.request("user", user=user)["user"]["counts"].get("impression", 0)
    except RequestFailedError as error:  # not in the state until the first one is folded
        if error.code != "not_found":
            raise
        return 0


def test_vectors_are_refreshed_off_the_request_path(start: Any, model_file: Path) -> None:
    """
    A ranked user's new events re-encode the cached vector in the background, so the
    next rank is a hit; a user nobody has ranked yet is left to their first rank.
    """
    daemon = start(_model_config(model_file))
    with daemon.client() as client:
        client.request("ingest", events=[_event(1, "view", user="fresh", item="m2")])
        client.request("ingest", events=[_event(2, "view", user="idle", item="m2")])
        client.request("rank", user="fresh", candidates=["m1", "m6", "m9"])  # a miss: encodes
        history = [_event(n, "view", user="fresh", item=f"m{n}") for n in (3, 4, 5)]
        history += [_event(10 + n, "view", user="idle", item=f"m{n}") for n in (3, 4, 5)]
        client.request("ingest", events=history)
        cache = poll(lambda: client.request("stats")["vector_cache"],
                      lambda c: c["refreshed"] >= 1, timeout_s=30)  # fmt: skip
        assert cache["refreshed"] == 1  # "fresh" only: "idle" has no cached vector
        ranked = client.request("rank", user="fresh", candidates=["m1", "m6", "m9"])
        after = client.request("stats")["vector_cache"]
        idle = client.request("rank", user="idle", candidates=["m1", "m6", "m9"])
        last = client.request("stats")["vector_cache"]
    assert "m6" == ranked["items"][0]
    assert (cache["hits"] + 1, cache["misses"]) == (after["hits"], after["misses"])
    assert "m6" == idle["items"][0]  # encoded on its first rank, with all its events
    assert (after["hits"], after["misses"] + 1) == (last["hits"], last["misses"])


def _cycle_views(users: int, length: int, items: int) -> list[dict[str, Any]]:
    """Each user views a run of ``length`` consecutive items of a cycle of ``items``."""
    return [_event(u * 100 + j, "view", user=f"cyc-{u}", item=f"c{(u + j) % items}")
            for u in range(users) for j in range(length)]  # fmt: skip


def test_first_start_without_a_model_trains_one_from_the_log(start: Any) -> None:
    """
    No model_path: too little data is said in the log and features rank; once the log
    has enough, a start trains a model in the background and serves it; the start after
    that loads the trained file before READY.
    """
    config = "[ranking]\ntrain_max_seconds = 20.0\n"
    daemon = start(config)
    log = daemon.tmp / "daemon.log"
    skipped = poll(log.read_text, lambda text: "model_training_skipped" in text, timeout_s=60)
    assert "too little data" in skipped
    with daemon.client() as client:
        client.request("ingest", events=_cycle_views(users=60, length=12, items=20))
        assert "none" == client.request("stats")["model"]
    assert 0 == daemon.stop()

    daemon = start(config)
    with daemon.client() as client:
        model = poll(lambda: client.request("stats")["model"], lambda m: m != "none",
                      timeout_s=240)  # fmt: skip
        assert model.endswith("model.safetensors")
        ranked = client.request("rank", user="cyc-0", candidates=["c3", "c15", "c12", "c7"])
    # cyc-0 viewed c0 .. c11: the model puts the cycle's next item, c12, first
    assert "model" == ranked["source"]
    assert "c12" == ranked["items"][0]
    assert "model_trained" in log.read_text()
    assert 0 == daemon.stop()

    daemon = start(config)
    with daemon.client() as client:
        assert client.request("health")["model"] is True
