"""
Real brokers for tests: Apache Kafka in KRaft mode (``scripts/kafka``) and Mosquitto
(``scripts/mosquitto``), each a process of its own on free loopback ports, with its data
in a directory that survives ``stop()``/``kill()`` and ``start()``.

Tests import this module as ``brokers`` (``tests/`` is on ``sys.path`` because of the
root ``conftest.py``); the session fixtures are in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code

__all__ = ["BrokerError", "KafkaBroker", "MqttBroker", "free_ports", "unique_name"]

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

#: Bound on one script call: Kafka's own start waits at most 90 s, its stop 40 s.
SCRIPT_TIMEOUT_S = 150


class BrokerError(RuntimeError):
    """A broker script failed; the message holds its output (with the broker log's tail)."""

    def __init__(self, command: list[str], returncode: int, output: str) -> None:
        self.command = command
        self.returncode = returncode
        self.output = output
        super().__init__(f"{' '.join(command)} exited {returncode}:\n{output}")


def free_ports(n: int) -> list[int]:
    """``n`` different TCP ports on 127.0.0.1 that nothing listens on right now."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:  # all bound at once, so the kernel hands out n different ports
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def unique_name(prefix: str) -> str:
    """``prefix`` plus a random suffix: topics, groups and client ids of one test."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class _ScriptBroker:
    """A broker run by ``scripts/<name>`` on ``directory``; its pid file says if it runs."""

    script: Path
    pid_name: str

    def __init__(self, directory: Path, port: int, *extra_args: str) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self.directory = directory
        self._extra_args = extra_args
        self.start_s = 0.0  # how long the last start() took

    @property
    def bootstrap(self) -> str:
        """``host:port``, as clients take it."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the broker process is alive (by its pid file; zombies count as gone)."""
        pid_file = self.directory / self.pid_name
        try:
            stat = Path(f"/proc/{int(pid_file.read_text())}/stat").read_text()
        except (OSError, ValueError):
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    def start(self) -> None:
        """Start the broker on its data directory and port, unless it is running."""
        if not self.running:
            t0 = time.monotonic()
            self._run("start", str(self.directory), str(self.port), *self._extra_args)
            self.start_s = time.monotonic() - t0

    def stop(self) -> None:
        """Stop it cleanly (SIGTERM; SIGKILL after a bound); a stopped broker stays so."""
        self._run("stop", str(self.directory))

    def kill(self) -> None:
        """SIGKILL it, as a crash would; the data directory keeps what reached it."""
        self._run("kill", str(self.directory))

    def _run(self, *args: str) -> None:
        command = [str(self.script), *args]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, check=False
        )
        if done.returncode != 0:
            raise BrokerError(command, done.returncode, done.stdout + done.stderr)


class KafkaBroker(_ScriptBroker):
    """
    A single-node Kafka (broker and controller in one process) on ``127.0.0.1:port``.

    Topics are not auto-created: make them with :meth:`create_topic`.

    Args:
        directory: Holds the config, the data (``data/``) and ``broker.log``.
        port: The client listener.
        controller_port: The KRaft controller listener.
        proxied: ``(listen_port, advertised_port)``: a second client listener on
            ``listen_port`` that advertises ``127.0.0.1:advertised_port``, where a
            proxy forwarding to ``listen_port`` listens (``tests/chaos/proxy.py``):
            clients that bootstrap through the proxy then stay behind it, while
            :attr:`bootstrap` (``port``) reaches the broker directly.
    """

    script = SCRIPTS / "kafka"
    pid_name = "kafka.pid"

    def __init__(self, directory: Path, port: int, controller_port: int, *,
                 proxied: tuple[int, int] | None = None) -> None:  # fmt: skip
        super().__init__(directory, port, str(controller_port), *map(str, proxied or ()))
        self.controller_port = controller_port
        self.proxied = proxied

    @property
    def log(self) -> Path:
        return self.directory / "broker.log"

    async def create_topic(self, name: str, *, partitions: int = 1, timeout_s: float = 30) -> None:
        """
        Create topic ``name`` (an existing one is left as it is) and wait until every
        partition has a leader, so the first produce does not meet NotLeaderForPartition.
        """
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            async with asyncio.timeout(timeout_s):
                response = await admin.create_topics([NewTopic(name, partitions, 1)])
                # Errors come back in the response, not as exceptions.
                for _topic, code, message in response.topic_errors:
                    if code not in {0, TopicAlreadyExistsError.errno}:
                        raise for_code(code)(message)
                # Leaders appear in the metadata, which has no push: poll it.
                while not _has_leaders(await admin.describe_topics([name]), partitions):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            await admin.close()


def _has_leaders(topics: list[dict[str, Any]], partitions: int) -> bool:
    """Whether the one described topic has ``partitions`` partitions, each with a leader."""
    if len(topics) != 1 or topics[0]["error_code"] != 0:
        return False
    described = topics[0]["partitions"]
    return len(described) == partitions and all(p["leader"] >= 0 for p in described)


class MqttBroker(_ScriptBroker):
    """
    A Mosquitto broker on ``127.0.0.1:port`` that persists sessions and queued messages
    after every change, so even :meth:`kill` loses at most the last one.

    Args:
        directory: Holds ``mosquitto.conf``, ``mosquitto.db`` and ``mosquitto.log``.
        port: The MQTT listener.
    """

    script = SCRIPTS / "mosquitto"
    pid_name = "mosquitto.pid"

    @property
    def log(self) -> Path:
        return self.directory / "mosquitto.log"
