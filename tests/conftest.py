"""
Shared fixtures: a store directory, a decoder with a fixed clock, event factories, and
the real brokers.

One real Kafka and one real Mosquitto serve the whole session, each started the first
time a test asks for it (so ``pytest tests/kernels`` starts neither) and stopped when
the session ends; the feed tests and the privacy tests (``tests/plugins``) share them.
Tests that share a broker keep apart by their own topics, groups and client ids
(``brokers.unique_name``). A test that stops or kills a broker starts it again before
it ends (``start()`` does nothing when the broker runs), so the next test finds it up.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from eventstore import Event, EventDecoder, Store
from eventstore.schema import EVENT_CLASSES

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from brokers import KafkaBroker, MqttBroker

#: The tests' "now" in event time (2025-11-27). The decoder's clock runs 1e6 s
#: (about 11.6 days) ahead of it, so test events are never "in the future".
T0 = 1764250000.0



def make_event(kind: str = "click", n: int = 0, **fields: Any) -> Event:
    """
    An event struct of type ``kind`` with id ``e-<n>`` at ``T0 + n``, built without
    the decoder. Fields the type needs and ``fields`` does not give get defaults.
    """
    defaults: dict[str, Any] = {"id": f"e-{n}", "ts": T0 + n}
    if kind != "item":
        defaults["user"] = "u-1"
    if kind not in {"impression", "forget"}:
        defaults["item"] = "i-1"
    if kind == "impression":
        defaults["items"] = ["i-1", "i-2"]
    if kind == "rating":
        defaults["value"] = 4.0
    return EVENT_CLASSES[kind](**{**defaults, **fields})


def event_json(kind: str = "click", n: int = 0, **fields: Any) -> dict[str, Any]:
    """The JSON object form of :func:`make_event`; a field given as ``...`` is left out."""
    obj: dict[str, Any] = {"id": f"e-{n}", "type": kind, "ts": T0 + n}
    if kind != "item":
        obj["user"] = "u-1"
    if kind not in {"impression", "forget"}:
        obj["item"] = "i-1"
    if kind == "impression":
        obj["items"] = ["i-1", "i-2"]
    if kind == "rating":
        obj["value"] = 4.0
    obj.update(fields)
    return {k: v for k, v in obj.items() if v is not ...}


@pytest.fixture(name="decoder")
def fixture_decoder() -> EventDecoder:
    """A decoder whose clock is fixed at ``T0 + 1e6``."""
    return EventDecoder(clock=lambda: T0 + 1e6)


@pytest.fixture(name="make_event")
def fixture_make_event() -> Callable[..., Event]:
    """Factory: ``make_event("rating", 3, user="u-2", value=5.0)``."""
    return make_event


@pytest.fixture(name="event_bytes")
def fixture_event_bytes() -> Callable[..., bytes]:
    """Factory of JSON bytes: ``event_bytes("click", 1, user=5)``; ``field=...`` omits it."""
    return lambda kind="click", n=0, **fields: json.dumps(event_json(kind, n, **fields)).encode()


@pytest.fixture(name="store_dir")
def fixture_store_dir(tmp_path: Path) -> Path:
    """An empty directory for one store (``events.db`` and ``snapshots/`` go inside)."""
    path = tmp_path / "store"
    path.mkdir()
    return path


@pytest.fixture(name="store")
def fixture_store(store_dir: Path, decoder: EventDecoder) -> Iterator[Store]:
    """A store in ``store_dir`` with the fixed-clock decoder; no automatic snapshots."""
    store = Store(store_dir, decoder=decoder, snapshot_every=0)
    yield store
    store.close(snapshot=False)  # closing twice is harmless; tests may close it themselves


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--long",
        action="store_true",
        help="run tests/chaos at full length (200 kills, 100,000 fuzz inputs, longer faults)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "brokers: runs against the real Kafka and Mosquitto of tests/conftest.py"
    )
    config.addinivalue_line("markers", "chaos: fault and hostile-client tests of tests/chaos")


@pytest.fixture(name="long_run", scope="session")
def fixture_long_run(request: pytest.FixtureRequest) -> bool:
    """True under ``pytest --long``: chaos tests run their full length, else the CI one."""
    return bool(request.config.getoption("--long"))


@pytest.fixture(name="kafka_broker", scope="session")
def fixture_kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A running single-node Kafka (KRaft) on free loopback ports: ``.bootstrap``."""
    from brokers import KafkaBroker, free_ports  # noqa: PLC0415 - aiokafka only when asked

    port, controller_port = free_ports(2)
    broker = KafkaBroker(tmp_path_factory.mktemp("kafka"), port, controller_port)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture(name="mqtt_broker", scope="session")
def fixture_mqtt_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MqttBroker]:
    """A running Mosquitto with persistence on a free loopback port: ``.host``, ``.port``."""
    from brokers import MqttBroker, free_ports  # noqa: PLC0415 - aiokafka only when asked

    (port,) = free_ports(1)
    broker = MqttBroker(tmp_path_factory.mktemp("mosquitto"), port)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
