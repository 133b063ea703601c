"""
Model hot swap on a real daemon process over its real Unix socket: SIGHUP swaps in the
model file while requests keep coming, and an incompatible file is refused with its
reason while the old model keeps serving. One daemon for the module.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from daemons import Daemon, poll

from kernels.modelfile import save_model
from kernels.sasrec import SasrecConfig, init_params

NOW = time.time()
OLD_VOCABULARY = [f"m{i}" for i in range(1, 21)]
NEW_VOCABULARY = [*OLD_VOCABULARY, "x1", "x2"]  # the new model also knows x1
CANDIDATES = ["m1", "m6", "x1", "m9", "m12", "m15"]


def _save(path: Path, vocabulary: list[str], *, seed: int, created_at: str,
          nan: bool = False, members: int = 1) -> None:  # fmt: skip
    """
    An untrained model over ``vocabulary`` (``nan``: one NaN in an item embedding;
    ``members``: an ensemble, whose user vectors are that many times wider).
    """
    import datetime as dt  # noqa: PLC0415

    config = SasrecConfig(num_items=len(vocabulary), max_len=8, dim=8, num_blocks=1,
                          dropout=0.0, members=members)  # fmt: skip
    params = {k: np.array(v) for k, v in init_params(jax.random.key(seed), config).items()}
    if nan:
        params["item_emb"][..., 3, 1] = np.nan
    save_model(path, params, config, vocabulary=vocabulary,  # atomic: a temporary file renamed
               created_at=dt.datetime.fromisoformat(created_at))  # fmt: skip


def _replace(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` atomically, as a deployment would."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


@pytest.fixture(name="daemon", scope="module")
def fixture_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """
    A daemon serving the old model, which knows 20 items; user histories over all of
    them (so the state knows 20 items), dated in the past, and no impression records:
    the same request gets the same scores until the model changes.
    """
    tmp = tmp_path_factory.mktemp("swap")
    model = tmp / "model.safetensors"
    _save(model, OLD_VOCABULARY, seed=1, created_at="2026-01-01T00:00:00+00:00")
    daemon = Daemon(tmp, (
        "max_candidates = 32\n[ranking]\n"
        f'model_path = "{model}"\nmax_batch = 4\nbatch_buckets = [1, 4]\n'
        "candidate_buckets = [8, 32]\nrecord_impressions = false\n"
    ))  # fmt: skip
    try:
        daemon.wait_for("READY=1")
        events = [{"id": f"e-{u}-{n}", "type": "view", "user": u, "item": item,
                   "ts": NOW - 3600 + n} for u in ("load-0", "load-1", "same")
                  for n, item in enumerate(OLD_VOCABULARY)]  # fmt: skip
        with daemon.client() as client:
            assert len(events) == client.request("ingest", events=events)["accepted"]
        yield daemon
    finally:
        daemon.close()


def _model_path(daemon: Daemon) -> Path:
    return daemon.tmp / "model.safetensors"


def _log_events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines whose event is ``event``, in order."""
    lines = (daemon.tmp / "daemon.log").read_text(errors="replace").splitlines()
    found = []
    for line in lines:
        if f'"{event}"' in line:
            record = json.loads(line)
            if record.get("event") == event:
                found.append(record)
    return found


class _Load:
    """Threads that send explain requests without pause, each on its own connection."""

    def __init__(self, daemon: Daemon, threads: int) -> None:
        self.daemon = daemon
        self.stop = threading.Event()
        self.answers: list[tuple[float, float, bool, str]] = []  # sent, answered, knows x1, source
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(f"load-{k}",), daemon=True)
                        for k in range(threads)]  # fmt: skip
        for thread in self.threads:
            thread.start()

    def _run(self, user: str) -> None:
        try:
            with self.daemon.client() as client:
                while not self.stop.is_set():
                    sent = time.monotonic()
                    answer = client.request("explain", user=user, candidates=CANDIDATES)
                    x1 = answer["explain"][answer["items"].index("x1")]
                    self.answers.append((sent, time.monotonic(), x1["known_to_model"],
                                         answer["source"]))  # fmt: skip
        except Exception as error:  # noqa: BLE001 - every failure is the test's finding
            self.failures.append(repr(error))

    def sent_after(self, when: float) -> list[tuple[float, float, bool, str]]:
        return [a for a in self.answers if a[0] > when]

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=30)


def test_hot_swap_under_load_fails_no_request(daemon: Daemon) -> None:
    """
    While two connections rank without pause, the model file is replaced atomically and
    SIGHUP sent: no request fails, answers before the swap come from the old model (it
    does not know x1), every request sent after ``reloaded`` from the new one (it does).
    The new model is a 3-member ensemble: user vectors change width at the swap.
    """
    load = _Load(daemon, threads=2)
    try:
        assert len(poll(lambda: load.answers, lambda a: len(a) >= 10, timeout_s=30)) >= 10
        _save(_model_path(daemon), NEW_VOCABULARY, seed=2, created_at="2026-02-01T00:00:00+00:00",
              members=3)  # fmt: skip
        hangup = time.monotonic()
        daemon.proc.send_signal(signal.SIGHUP)
        poll(lambda: _log_events(daemon, "reloaded"), bool, timeout_s=60)
        seen = time.monotonic()
        poll(lambda: load.sent_after(seen), lambda a: len(a) >= 10, timeout_s=30)
    finally:
        load.join()
    assert [] == load.failures
    before = [a for a in load.answers if a[1] < hangup]
    after = load.sent_after(seen)
    assert (len(before) >= 10, len(after) >= 10) == (True, True)
    assert {False} == {knows for _, _, knows, _ in before}
    assert {True} == {knows for _, _, knows, _ in after}
    assert {"model"} == {source for *_, source in load.answers}
    with daemon.client() as client:
        stats = client.request("stats")
    assert ("2026-02-01T00:00:00+00:00", 3) == (stats["model_created_at"], stats["model_members"])


def _truncated(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


def _non_finite(path: Path) -> bytes:
    other = path.with_name("nan.safetensors")
    _save(other, OLD_VOCABULARY, seed=3, created_at="2026-03-01T00:00:00+00:00", nan=True)
    return other.read_bytes()


def _other_catalogue(path: Path) -> bytes:
    other = path.with_name("other.safetensors")
    vocabulary = [f"zz-item-{i}" for i in range(1, 21)]
    _save(other, vocabulary, seed=4, created_at="2026-04-01T00:00:00+00:00")
    return other.read_bytes()


def test_an_incompatible_model_is_refused_and_the_old_one_keeps_serving(daemon: Daemon) -> None:
    """
    A truncated file, NaN parameters and a vocabulary sharing no item with the state's
    are each refused on SIGHUP, logged as model_refused with the rule as its reason (no
    item id in the line), and ranking answers as before, from the old model.
    """
    path = _model_path(daemon)
    request = {"user": "same", "candidates": [*CANDIDATES[:5], "m20"]}
    with daemon.client() as client:
        served = client.request("stats")["model_created_at"]
        before = client.request("rank", **request)
        assert "model" == before["source"]
        for make, reason in ((_truncated, "corrupt"), (_non_finite, "non_finite"),
                             (_other_catalogue, "disjoint_vocabulary")):  # fmt: skip
            refusals = len(_log_events(daemon, "model_refused"))
            _replace(path, make(path))
            daemon.proc.send_signal(signal.SIGHUP)
            logged = poll(lambda: _log_events(daemon, "model_refused"),
                          lambda r, n=refusals: len(r) > n, timeout_s=60)  # fmt: skip
            assert (reason, "reload") == (logged[-1]["reason"], logged[-1]["at"])
            assert "zz-item" not in json.dumps(logged[-1])
            after = client.request("rank", **request)
            assert (before["items"], before["scores"], "model") == (
                after["items"], after["scores"], after["source"])  # fmt: skip
            assert served == client.request("stats")["model_created_at"]


def test_a_new_item_gets_a_cold_start_vector_in_the_background(daemon: Daemon) -> None:
    """
    An item the model does not know, announced by an item event, is scored with a
    cold-start vector (here the popularity one: no item has a category) within seconds.
    """
    with daemon.client() as client:
        event = {"id": "item-fresh", "type": "item", "item": "fresh-1", "ts": NOW - 60,
                 "fields": {"title": "new"}}  # fmt: skip
        assert 1 == client.request("ingest", events=[event])["accepted"]

        def fresh() -> dict[str, Any]:
            answer = client.request("explain", user="same", candidates=["m1", "fresh-1"])
            return dict(answer["explain"][answer["items"].index("fresh-1")])

        entry = poll(fresh, lambda e: "cold_start" in e, timeout_s=30)
    assert ("popularity", False) == (entry.get("cold_start"), entry["known_to_model"])
    assert entry["model"] != 0.0


def test_a_refused_model_path_is_a_start_up_error(rerankd: Any, tmp_path: Path) -> None:
    """A [ranking].model_path with NaN parameters stops the start: exit 1, the rule named."""
    model = tmp_path / "nan.safetensors"
    _save(model, OLD_VOCABULARY, seed=5, created_at="2026-05-01T00:00:00+00:00", nan=True)
    config = tmp_path / "rerankd.toml"
    config.write_text(f'[store]\ndata_dir = "{tmp_path / "data"}"\n'
                      f'[server]\nsocket_path = "{tmp_path / "rerankd.sock"}"\n'
                      f'[ranking]\nmodel_path = "{model}"\n')  # fmt: skip
    result = rerankd(tmp_path, "run", "--config", str(config))
    assert 1 == result.returncode
    assert f"model file {model} refused (non_finite)" in result.stderr
    refused = [json.loads(line) for line in result.stdout.splitlines() if "model_refused" in line]
    assert [("non_finite", "start")] == [(r["reason"], r["at"]) for r in refused]


def test_a_refused_trained_model_is_set_aside_at_start(start: Any, tmp_path: Path) -> None:
    """
    Without model_path, a refused <data_dir>/model.safetensors (a bad retrain) does not
    keep the daemon down: it is logged and the daemon ranks by features.
    """
    (tmp_path / "data").mkdir()
    _save(tmp_path / "data" / "model.safetensors", OLD_VOCABULARY, seed=6,
          created_at="2026-06-01T00:00:00+00:00", nan=True)  # fmt: skip
    daemon = start("[ranking]\ntrain_on_start = false\n")
    with daemon.client() as client:
        assert client.request("health")["model"] is False
        assert "features" == client.request("rank", user="u", candidates=["m1", "m2"])["source"]
    refused = _log_events(daemon, "model_refused")
    assert [("non_finite", "start")] == [(r["reason"], r["at"]) for r in refused]
