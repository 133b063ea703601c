"""
The MQTT feed against a Mosquitto that wants TLS and a password: a CA and a server
certificate made with ``openssl`` for the test, a password file made with
``mosquitto_passwd``, anonymous clients refused.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from brokers import free_ports, unique_name
from test_mqtt import event, logged_ids, running, until

from daemon.config import MqttSection
from daemon.feeds import FeedSink
from daemon.feeds.mqtt import MqttFeed
from eventstore import EventDecoder, GroupCommitter, Store

pytestmark = pytest.mark.brokers

USER = "rerankd"
PASSWORD = "s3cret-for-the-test"  # noqa: S105 - a throwaway broker's password


@dataclass(frozen=True)
class TlsBroker:
    port: int
    ca_file: Path
    directory: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certificates(d: Path) -> None:
    """A CA, and a server certificate for 127.0.0.1 signed by it."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
             "/CN=rerankd test CA", "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", "server.key", "-out", "server.csr", cwd=d)  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.crt",
             cwd=d)  # fmt: skip


def _answers_tls(port: int, ca_file: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1) as s,
            context.wrap_socket(s, server_hostname="127.0.0.1"),
        ):
            return True
    except OSError:
        return False


@pytest.fixture(name="tls_broker", scope="module")
def fixture_tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    d = tmp_path_factory.mktemp("mosquitto-tls")
    _make_certificates(d)
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(d / "passwords"), USER, PASSWORD],
                   check=True, capture_output=True)  # fmt: skip
    (port,) = free_ports(1)
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout
    (d / "mosquitto.conf").write_text(
        f"listener {port} 127.0.0.1\n"
        f"cafile {d / 'ca.crt'}\ncertfile {d / 'server.crt'}\nkeyfile {d / 'server.key'}\n"
        f"allow_anonymous false\npassword_file {d / 'passwords'}\n"
        f"user {user.strip()}\npersistence false\nlog_dest file {d / 'mosquitto.log'}\n"
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(d / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not _answers_tls(port, d / "ca.crt"):
            assert proc.poll() is None, (d / "mosquitto.log").read_text()
            assert time.monotonic() < deadline, "the TLS broker did not come up"
            time.sleep(0.05)
        yield TlsBroker(port, d / "ca.crt", d)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _section(broker: TlsBroker, topic: str, tmp_path: Path, password: str, **more: object,
             ) -> MqttSection:  # fmt: skip
    secret = tmp_path / "mqtt-password"
    secret.write_text(password + "\n")
    options: dict[str, object] = {
        "url": f"mqtts://127.0.0.1:{broker.port}", "topics": (topic,),
        "client_id": unique_name("feed"), "username": USER, "password_file": str(secret),
        "ca_file": str(broker.ca_file), "reconnect_min_s": 0.05, "reconnect_max_s": 0.2,
    }  # fmt: skip
    return MqttSection(**{**options, **more})  # type: ignore[arg-type]


@pytest.fixture(name="sink")
def fixture_sink(store: Store, decoder: EventDecoder) -> Iterator[FeedSink]:
    committer = GroupCommitter(store.append, dead_letter_sink=store.log.dead_letters)
    yield FeedSink(committer, decoder, store.log.path, retry_s=0.05)
    committer.close()


async def _publish(broker: TlsBroker, topic: str, payloads: list[bytes]) -> None:
    context = ssl.create_default_context(cafile=str(broker.ca_file))
    async with aiomqtt.Client("127.0.0.1", broker.port, username=USER, password=PASSWORD,
                              tls_context=context,
                              protocol=aiomqtt.ProtocolVersion.V5) as client:  # fmt: skip
        for payload in payloads:
            await client.publish(topic, payload, qos=1)


async def test_events_arrive_over_tls_with_a_password_from_a_file(
    tls_broker: TlsBroker, sink: FeedSink, store: Store, tmp_path: Path
) -> None:
    """The feed verifies the broker against ca_file, logs in, and appends what arrives."""
    topic = unique_name("events")
    feed = MqttFeed(_section(tls_broker, topic, tmp_path, PASSWORD), sink)
    async with running(feed) as task:
        await _publish(tls_broker, topic, [event(n) for n in range(20)])
        await until(lambda: feed.acked >= 20, task)
    assert [f"e-{n}" for n in range(20)] == logged_ids(store)
    assert (1, 0) == (feed.connects, feed.stats()["reconnect_failures"])


async def test_a_wrong_password_keeps_retrying_and_says_nothing_of_it(
    tls_broker: TlsBroker, sink: FeedSink, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused logins are retried with backoff; the password never reaches the logs."""
    feed = MqttFeed(_section(tls_broker, unique_name("events"), tmp_path, "wrong-pass"), sink)
    task = asyncio.create_task(feed.run())
    try:
        await until(lambda: feed.stats()["reconnect_failures"] >= 3, task)
        assert not feed.connected
    finally:
        task.cancel()
        await asyncio.wait([task], timeout=10)
    assert 0 == feed.connects
    out = capsys.readouterr()
    assert "wrong-pass" not in out.out + out.err


async def test_a_broker_the_ca_does_not_vouch_for_is_refused(
    tls_broker: TlsBroker, sink: FeedSink, tmp_path: Path
) -> None:
    """Without the test CA (the system's CAs only), the broker's certificate fails."""
    feed = MqttFeed(_section(tls_broker, unique_name("events"), tmp_path, PASSWORD,
                             ca_file=""), sink)  # fmt: skip
    task = asyncio.create_task(feed.run())
    try:
        await until(lambda: feed.stats()["reconnect_failures"] >= 2, task)
    finally:
        task.cancel()
        await asyncio.wait([task], timeout=10)
    assert (0, False) == (feed.connects, feed.connected)
