"""
The two systemd interfaces the daemon speaks: sd_notify and socket activation.

Both are small wire formats, written here rather than pulled in as a dependency: the
python-systemd bindings need libsystemd headers to build, and the notify protocol is
one datagram of ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named by
``$NOTIFY_SOCKET`` (sd_notify(3)); socket activation is fd 3 onwards when
``$LISTEN_PID`` is our pid (sd_listen_fds(3)).
"""

from __future__ import annotations

import os
import socket
from typing import Final

__all__ = ["LISTEN_FDS_START", "inherited_socket", "notify", "watchdog_interval_s"]

LISTEN_FDS_START: Final = 3


def notify(*lines: str) -> bool:
    """
    Send ``lines`` (e.g. ``"READY=1"``) to the service manager.

    Returns False when not run under a manager that listens (no ``$NOTIFY_SOCKET``);
    a send failure is reported the same way, never raised: notification is advisory.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(lines).encode())
    except OSError:
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half the watchdog period systemd asked for (``$WATCHDOG_USEC``), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec), 1) / 2e6
    except ValueError:
        return None


def inherited_socket() -> socket.socket | None:
    """
    The listening Unix socket handed over by socket activation, or None.

    Only the first passed descriptor is used; ``LISTEN_*`` are removed from the
    environment so that child processes do not take them for theirs.
    """
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if pid != str(os.getpid()) or not count or int(count) < 1:
        return None
    sock = socket.socket(fileno=LISTEN_FDS_START)
    os.set_inheritable(LISTEN_FDS_START, False)  # noqa: FBT003 - os's own signature
    sock.setblocking(False)  # noqa: FBT003
    return sock
