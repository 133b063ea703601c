"""
Fixtures for the feeds' tests: one real Kafka and one real Mosquitto for the session,
each started the first time a test asks for it (so ``pytest tests/kernels`` starts
neither) and stopped when the session ends.

Tests that share a broker keep apart by their own topics, groups and client ids
(``brokers.unique_name``). A test that stops or kills a broker starts it again before
it ends (``start()`` does nothing when the broker runs), so the next test finds it up.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from brokers import KafkaBroker, MqttBroker, free_ports


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "brokers: runs against the real Kafka and Mosquitto of tests/feeds/conftest.py"
    )


@pytest.fixture(name="kafka_broker", scope="session")
def fixture_kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A running single-node Kafka (KRaft) on free loopback ports: ``.bootstrap``."""
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
    (port,) = free_ports(1)
    broker = MqttBroker(tmp_path_factory.mktemp("mosquitto"), port)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
