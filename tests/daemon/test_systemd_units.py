"""
The systemd units in systemd/: `systemd-analyze verify` and `security` on them, and
the sandbox they set up, emulated where PID 1 is not systemd.

The emulation starts the real daemon (or a JIT probe) through a launcher that
applies what systemd would apply between fork and exec: the unit's system call
allow list (via libseccomp, which systemd itself links), MemoryDenyWriteExecute
(``prctl(PR_SET_MDWE)`` or the seccomp filter of systemd < 254), and, when run as
root, a read-only file system with ``/proc`` mounted ``subset=pid``
(ProtectSystem=strict, ProcSubset=pid). Then it execs, as systemd does.

`systemd-analyze` comes with Debian's ``systemd`` package; missing, these tests fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemon.client import Client

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
SERVICE, SOCKET = "rerankd.service", "rerankd.socket"
RETRAIN, TIMER = "rerankd-retrain.service", "rerankd-retrain.timer"
ALL_UNITS = (SERVICE, SOCKET, RETRAIN, TIMER)

#: What ``systemd-analyze security --offline=true`` gives with systemd 252 (Debian
#: 12): 1.3, "OK". Dropping any one of SystemCallFilter= (2.8), CapabilityBoundingSet=
#: (3.0), RestrictNamespaces= (2.0), PrivateDevices= (1.5), ProtectProc= (1.4), ...
#: goes above it. A newer systemd may rate differently: measure again then.
MAX_EXPOSURE = 1.3
#: The same for rerankd-retrain.service, measured alike: 0.4, "SAFE" (no network).
MAX_RETRAIN_EXPOSURE = 0.4

#: The daemon under test pings every WATCHDOG_USEC / 2 = 0.5 s.
_WATCHDOG_USEC = 1_000_000

#: What systemd does between fork and exec, from a JSON spec in argv[1]; argv[2:]
#: is the command to exec. Order as in systemd: mounts, MDWE, seccomp, exec.
LAUNCHER = r"""
import ctypes, json, os, sys

spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)

def check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        sys.exit(f"launcher: {what}: {os.strerror(errno)} (errno {errno})")

if spec.get("writable") is not None:  # ProtectSystem=strict, ProcSubset=pid
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
    MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
    check(libc.unshare(0x00020000), "unshare(CLONE_NEWNS)")
    check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    for path in spec["writable"]:
        check(libc.mount(path.encode(), path.encode(), None, MS_BIND, None), f"bind {path}")
    keep = ("/proc", "/sys", "/dev")  # the API file systems ProtectSystem=strict leaves
    with open("/proc/self/mountinfo") as table:
        points = [line.split()[4].replace("\\040", " ") for line in table]
    for point in points:
        if point in spec["writable"] or any(point == k or point.startswith(k + "/") for k in keep):
            continue
        libc.mount(None, point.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
    options = b"subset=pid,hidepid=invisible"
    check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, options),
          "mount /proc subset=pid")
    os.chdir("/")

if spec.get("mdwe") == "prctl":  # systemd >= 254 on Linux >= 6.3
    check(libc.prctl(65, 1, 0, 0, 0), "prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN)")

seccomp = ctypes.CDLL("libseccomp.so.2", use_errno=True)
seccomp.seccomp_init.restype = ctypes.c_void_p
seccomp.seccomp_init.argtypes = [ctypes.c_uint32]
seccomp.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
seccomp.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
seccomp.seccomp_load.argtypes = [ctypes.c_void_p]
ALLOW, KILL_PROCESS, EPERM = 0x7FFF0000, 0x80000000, 0x00050000 | 1

def nr(name):
    return seccomp.seccomp_syscall_resolve_name(name.encode())

if spec.get("mdwe") == "seccomp":  # systemd < 254, as systemd.exec(5) describes it
    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
    MASKED_EQ, PROT_WRITE, PROT_EXEC, SHM_EXEC = 7, 2, 4, 0o100000
    ctx = seccomp.seccomp_init(ALLOW)
    for name, mask, value in [("mmap", PROT_WRITE | PROT_EXEC, PROT_WRITE | PROT_EXEC),
                              ("mprotect", PROT_EXEC, PROT_EXEC),
                              ("pkey_mprotect", PROT_EXEC, PROT_EXEC),
                              ("shmat", SHM_EXEC, SHM_EXEC)]:
        rule = Cmp(1 if name == "shmat" else 2, MASKED_EQ, mask, value)
        check(seccomp.seccomp_rule_add_array(ctx, EPERM, nr(name), 1, ctypes.byref(rule)),
              f"MDWE rule for {name}")
    check(seccomp.seccomp_load(ctypes.c_void_p(ctx)), "seccomp_load (MDWE)")

if spec.get("allow_syscalls") is not None:  # SystemCallFilter=, SystemCallErrorNumber=
    assert spec.get("errno") in (None, "EPERM"), spec["errno"]
    ctx = seccomp.seccomp_init(EPERM if spec.get("errno") else KILL_PROCESS)
    for name in spec["allow_syscalls"]:
        if nr(name) >= 0:  # negative: not a system call of this architecture
            check(seccomp.seccomp_rule_add_array(ctx, ALLOW, nr(name), 0, None), name)
    check(seccomp.seccomp_load(ctypes.c_void_p(ctx)), "seccomp_load (allow list)")

os.environ.update(spec.get("env", {}))
if spec.get("listen_fd") is not None:  # socket activation: fd 3, LISTEN_PID = ours
    os.dup2(spec["listen_fd"], 3)
    os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
os.execv(sys.argv[2], sys.argv[2:])
"""

#: A JIT-compiled function each of XLA (CPU backend) and numba; prints JIT-OK.
JIT_PROBES = {
    "jax": (
        "import jax, jax.numpy as jnp\n"
        "assert float(jax.jit(lambda x: x * 2 + 1)(jnp.arange(4.0)).sum()) == 16.0\n"
        "print('JIT-OK')\n"
    ),
    "numba": "import numba\nassert numba.njit(lambda x: x * 2 + 1)(3) == 7\nprint('JIT-OK')\n",
}


# ------------------------------------------------------------------ fixtures


@pytest.fixture(name="analyze", scope="module")
def fixture_analyze() -> str:
    """The path of systemd-analyze; its absence fails the test (CI must install it)."""
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze not found: install the Debian package `systemd` "
            "(these tests check the units in systemd/ and must not be skipped)"
        )
    return path


@pytest.fixture(name="units")
def fixture_units(tmp_path: Path) -> Path:
    """
    Every unit in a temporary directory, the services' ExecStart= pointing at an
    executable that exists (verify insists on it) instead of /usr/local/bin/rerankd.
    """
    directory = tmp_path / "units"
    directory.mkdir()
    for unit in ALL_UNITS:
        text = (UNITS / unit).read_text()
        if unit.endswith(".service"):
            assert "ExecStart=/usr/local/bin/rerankd " in text
            text = text.replace("ExecStart=/usr/local/bin/rerankd ", f"ExecStart={sys.executable} ")
        (directory / unit).write_text(text)
    return directory


def _verify(analyze: str, units: Path) -> tuple[int, list[str]]:
    """Exit status of `systemd-analyze verify` and its output lines about our units."""
    result = subprocess.run(
        [analyze, "verify", *(units / unit for unit in ALL_UNITS)],
        capture_output=True, text=True, cwd=units, timeout=60, check=False,
    )  # fmt: skip
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if "rerankd" in line]


# ------------------------------------------------------- systemd-analyze


def test_verify_accepts_every_unit(analyze: str, units: Path) -> None:
    """
    `systemd-analyze verify` of the service, the socket, the retrain service and its
    timer exits 0 and prints nothing about rerankd's units.
    """
    assert (0, []) == _verify(analyze, units)


@pytest.mark.parametrize(("unit", "key"), [
    (SERVICE, "ProtectClock="), (RETRAIN, "PrivateNetwork="), (TIMER, "Persistent="),
])  # fmt: skip
def test_verify_reports_a_misspelt_directive(
    analyze: str, units: Path, unit: str, key: str
) -> None:
    """The check above would see a warning: a misspelt key is reported by unit name."""
    path = units / unit
    assert key in path.read_text()
    path.write_text(path.read_text().replace(key, key.replace("=", "s=")))
    _, lines = _verify(analyze, units)
    assert any(key.replace("=", "s") in line and unit in line for line in lines)


@pytest.mark.parametrize(("unit", "limit"), [(SERVICE, MAX_EXPOSURE),
                                             (RETRAIN, MAX_RETRAIN_EXPOSURE)])  # fmt: skip
def test_security_exposure_is_at_most_the_measured_level(
    analyze: str, units: Path, unit: str, limit: float
) -> None:
    """`systemd-analyze security --offline=true` rates each service at most as measured."""
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", units / unit],
        capture_output=True, text=True, cwd=units, timeout=60, check=False,
    )  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert found is not None, result.stdout + result.stderr
    assert float(found.group(1)) <= limit, result.stdout


# --------------------------------------------------------- the retrain timer


def test_the_timer_runs_train_log_and_the_daemon_reloads_its_output() -> None:
    """
    The timer starts rerankd-retrain.service, which runs `rerankd train --log` on the
    daemon's config and writes the file the daemon serves (rerankd-system.toml sets no
    model_path: <data_dir>/model.safetensors), one encoder, then reloads the running
    daemon.
    """
    from daemon._model import TRAINED_MODEL  # noqa: PLC0415 - it imports JAX
    from daemon.config import load_config  # noqa: PLC0415

    assert [RETRAIN] == _unit_values("Unit", TIMER)
    assert ["true"] == _unit_values("Persistent", TIMER)
    assert ["oneshot"] == _unit_values("Type", RETRAIN)
    [command] = _unit_values("ExecStart", RETRAIN)
    program, *args = command.split()
    [daemon_command] = _unit_values("ExecStart", SERVICE)
    assert program == daemon_command.split()[0]
    assert ["train", "--log"] == args[:2]
    options = dict(zip(args[2::2], args[3::2], strict=True))
    assert options["--config"] == daemon_command.split("--config ")[1]
    config = load_config(UNITS / "rerankd-system.toml")
    assert config.ranking.model_path is None
    assert Path(options["--out"]) == config.store.data_dir / TRAINED_MODEL
    assert options["--members"] == "1"  # the daemon's latency over an ensemble's quality
    assert ["+/bin/systemctl try-reload-or-restart rerankd.service"] == _unit_values(
        "ExecStartPost", RETRAIN
    )


def test_the_retrain_unit_shares_the_daemons_user_and_directories() -> None:
    """
    One dynamic user for both (a second one would have systemd chown the state
    directory away from the running daemon), the same state and cache directories and
    numba cache, and no MemoryDenyWriteExecute (XLA's JIT).
    """
    keys = ("User", "DynamicUser", "StateDirectory", "StateDirectoryMode", "CacheDirectory",
            "UMask", "MemoryDenyWriteExecute", "SystemCallFilter")  # fmt: skip
    for key in keys:
        assert _unit_values(key, SERVICE) == _unit_values(key, RETRAIN), key
    assert ["rerankd"] == _unit_values("User", RETRAIN)
    numba = "NUMBA_CACHE_DIR=/var/cache/rerankd/numba"
    assert numba in _unit_values("Environment", SERVICE)
    assert numba in _unit_values("Environment", RETRAIN)


# -------------------------------------------------- the sandbox, emulated


def _launch(spec: dict[str, Any], *command: str, **popen: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(spec), *command], **popen)


def _probe(probe: str, spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    process = _launch(
        spec, sys.executable, "-c", JIT_PROBES[probe],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, out.decode(), "")


def _mdwe_available() -> bool:
    """Whether this kernel has PR_SET_MDWE (Linux >= 6.3); checked in a child."""
    code = "import ctypes; raise SystemExit(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0) != 0)"
    return subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


_JIT_FAILURE = {  # what each compiler says when it may not make its code executable
    "jax": "Failed to materialize symbols",
    "numba": "cannot allocate executable memory",
}


@pytest.mark.parametrize("mechanism", ["prctl", "seccomp"])
@pytest.mark.parametrize("probe", ["jax", "numba"])
def test_jit_compilers_fail_under_memory_deny_write_execute(probe: str, mechanism: str) -> None:
    """
    Why the service keeps MemoryDenyWriteExecute=no: XLA's CPU backend and numba
    work without it and fail under it, as systemd applies it (PR_SET_MDWE with
    REFUSE_EXEC_GAIN on systemd >= 254, a seccomp filter before).
    """
    if mechanism == "prctl" and not _mdwe_available():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    free = _probe(probe, {})
    assert (0, True) == (free.returncode, "JIT-OK" in free.stdout), free.stdout
    denied = _probe(probe, {"mdwe": mechanism})
    assert denied.returncode != 0, denied.stdout
    assert _JIT_FAILURE[probe] in denied.stdout


def _syscall_groups(analyze: str) -> dict[str, list[str]]:
    """Every group of `systemd-analyze syscall-filter`, its members as listed."""
    out = subprocess.run(
        [analyze, "syscall-filter"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif not line.strip() or line.startswith("#"):
            current = None
        elif current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def _expand(groups: dict[str, list[str]], names: str) -> set[str]:
    out: set[str] = set()
    for name in names.split():
        out |= _expand(groups, " ".join(groups[name])) if name.startswith("@") else {name}
    return out


def _unit_syscall_allow_list(analyze: str) -> list[str]:
    """The service's SystemCallFilter= lines resolved the way systemd does."""
    groups = _syscall_groups(analyze)
    allowed: set[str] | None = None
    for value in _unit_values("SystemCallFilter"):
        if value.startswith("~"):
            assert allowed is not None, "the first SystemCallFilter= must be an allow list"
            allowed -= _expand(groups, value[1:])
        else:
            allowed = (allowed or _expand(groups, "@default")) | _expand(groups, value)
    assert allowed, "the service has no SystemCallFilter= allow list"
    return sorted(allowed)


def _unit_values(key: str, unit: str = SERVICE) -> list[str]:
    """The values of every ``key=`` line of ``unit`` (the service by default), in order."""
    prefix = f"{key}="
    lines = (UNITS / unit).read_text().splitlines()
    return [line.removeprefix(prefix) for line in lines if line.startswith(prefix)]


def _unit_syscall_filter(analyze: str) -> dict[str, Any]:
    """The launcher spec of the service's SystemCallFilter= and SystemCallErrorNumber=."""
    errno = _unit_values("SystemCallErrorNumber")
    return {
        "allow_syscalls": _unit_syscall_allow_list(analyze),
        "errno": errno[-1] if errno else None,
    }


def _unit_environment() -> dict[str, str]:
    """The Environment= assignments of the service."""
    return dict(value.split("=", 1) for value in _unit_values("Environment"))


@pytest.fixture(name="model_file", scope="module")
def fixture_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained model over items m1..m8: enough to compile and run the kernels."""
    import jax  # noqa: PLC0415 - only the daemon tests need JAX in the test process

    from kernels.modelfile import save_model  # noqa: PLC0415
    from kernels.sasrec import SasrecConfig, init_params  # noqa: PLC0415

    config = SasrecConfig(num_items=8, max_len=8, dim=8, num_blocks=1, dropout=0.0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    params = init_params(jax.random.key(0), config)
    save_model(path, params, config, vocabulary=[f"m{i}" for i in range(1, 9)])
    return path


class _Sandboxed:
    """`rerankd run` started by the launcher the way systemd starts the service."""

    def __init__(self, tmp: Path, model: Path, spec: dict[str, Any]) -> None:
        self.tmp = tmp
        config = tmp / "rerankd.toml"
        config.write_text(
            f'[store]\ndata_dir = "{tmp / "state"}"\n'
            f'[server]\nsocket_path = "{tmp / "unused.sock"}"\nmax_candidates = 16\n'
            f'[ranking]\nmodel_path = "{model}"\nmax_batch = 2\nbatch_buckets = [1, 2]\n'
            "candidate_buckets = [16]\n"
        )
        self.socket_path = tmp / "rerankd.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.socket_path))
        self.listener.listen()
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify.sock"))
        self.messages: list[str] = []
        self.log = (tmp / "daemon.log").open("wb")
        env = {
            "PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
            "NOTIFY_SOCKET": str(tmp / "notify.sock"), "WATCHDOG_USEC": str(_WATCHDOG_USEC),
        }  # fmt: skip
        spec = {**spec, "listen_fd": self.listener.fileno()}
        self.proc = _launch(
            spec, sys.executable, "-m", "daemon.cli", "run", "--config", str(config),
            env=env, stdout=self.log, stderr=subprocess.STDOUT,
            pass_fds=(self.listener.fileno(),),
        )  # fmt: skip

    def wait_for(self, message: str, timeout_s: float = 180.0) -> None:
        """Block until ``message`` arrived on NOTIFY_SOCKET; fail with the log if not."""
        deadline = time.monotonic() + timeout_s
        while not any(message in m for m in self.messages):
            exited = self.proc.poll() is not None
            remaining = deadline - time.monotonic()
            self.notify.settimeout(0.0 if exited else max(min(remaining, 1.0), 0.0))
            try:
                self.messages.append(self.notify.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                if exited or remaining <= 0:
                    pytest.fail(f"no {message} (exit {self.proc.poll()}); log:\n{self.log_text()}")

    def log_text(self) -> str:
        """The last 3000 characters the daemon wrote."""
        return (self.tmp / "daemon.log").read_text(errors="replace")[-3000:]

    def wait_for_log(self, text: str, timeout_s: float = 120.0) -> None:
        """Block until ``text`` appears in the daemon's output; fail with the log if not."""
        deadline = time.monotonic() + timeout_s
        while text not in (self.tmp / "daemon.log").read_text(errors="replace"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                pytest.fail(f"no {text!r} (exit {self.proc.poll()}); log:\n{self.log_text()}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        self.notify.close()
        self.listener.close()


@pytest.fixture(name="sandboxed")
def fixture_sandboxed(tmp_path: Path, model_file: Path) -> Iterator[Any]:
    """sandboxed(spec) starts the daemon under ``spec`` (see LAUNCHER) on tmp_path."""
    started: list[_Sandboxed] = []

    def start(spec: dict[str, Any]) -> _Sandboxed:
        started.append(_Sandboxed(tmp_path, model_file, spec))
        return started[-1]

    yield start
    for daemon in started:
        daemon.close()


def assert_full_lifecycle(daemon: _Sandboxed) -> None:
    """Ready, watchdog, ingest, a model ranking, a reload, then a clean SIGTERM stop."""
    daemon.wait_for("READY=1")
    daemon.wait_for("WATCHDOG=1")
    now = time.time()
    events = [
        {"id": f"e-{n}", "type": "view", "user": "u", "item": f"m{n}", "ts": now - 10 + n}
        for n in range(1, 5)
    ]
    with Client(daemon.socket_path, timeout_s=60) as client:
        assert 4 == client.request("ingest", events=events)["accepted"]
        ranked = client.request("rank", user="u", candidates=["m5", "m6", "m7"])
        assert ("model", 3) == (ranked["source"], len(ranked["items"]))
    daemon.proc.send_signal(signal.SIGHUP)  # reloads the model: compiles again
    daemon.wait_for_log('"reloaded"')
    with Client(daemon.socket_path, timeout_s=60) as client:
        assert client.request("health")["model"] is True
    daemon.proc.send_signal(signal.SIGTERM)
    assert 0 == daemon.proc.wait(timeout=120)
    daemon.wait_for("STOPPING=1")


def test_daemon_serves_under_the_units_system_call_filter(analyze: str, sandboxed: Any) -> None:
    """
    Under the service's SystemCallFilter= and SystemCallErrorNumber= the daemon
    replays, compiles with XLA, folds with numba, serves, reloads on SIGHUP and stops
    with status 0.
    """
    daemon = sandboxed(_unit_syscall_filter(analyze))
    assert_full_lifecycle(daemon)


def _needs_mount_namespaces() -> None:
    probe = "import ctypes; raise SystemExit(ctypes.CDLL(None).unshare(0x00020000) != 0)"
    if os.geteuid() != 0 or subprocess.run([sys.executable, "-c", probe], check=False).returncode:
        pytest.skip("emulating ProtectSystem=strict needs root and mount namespaces")


def test_daemon_serves_on_a_read_only_system_with_proc_subset_pid(
    analyze: str, sandboxed: Any, tmp_path: Path
) -> None:
    """
    With the file system read-only but its state and cache directories (as
    ProtectSystem=strict leaves it), /proc mounted subset=pid (ProcSubset=pid),
    HOME=/ (a dynamic user's), the unit's Environment= and system call filter, the
    daemon works. The numba cache lands in the unit's NUMBA_CACHE_DIR. (Run as root,
    so file permissions are not emulated, only the read-only mounts.)
    """
    _needs_mount_namespaces()
    cache = tmp_path / "cache"
    cache.mkdir()
    unit_env = _unit_environment()
    numba_cache = Path(unit_env["NUMBA_CACHE_DIR"])
    assert numba_cache.parent == Path("/var/cache", *_unit_values("CacheDirectory"))
    env = unit_env | {
        "NUMBA_CACHE_DIR": str(cache / numba_cache.name),  # CacheDirectory=, moved here
        "HOME": "/",  # a dynamic user's home
        "TMPDIR": str(tmp_path),  # PrivateTmp=: a /tmp of its own
    }
    daemon = sandboxed({"writable": [str(tmp_path)], "env": env} | _unit_syscall_filter(analyze))
    assert_full_lifecycle(daemon)
    assert list((cache / numba_cache.name).rglob("*.nbi"))


def test_numba_cannot_cache_on_a_read_only_system_without_numba_cache_dir(
    tmp_path: Path,
) -> None:
    """
    Why the unit sets NUMBA_CACHE_DIR: on a read-only package tree with HOME=/ the
    fold kernel's ``cache=True`` finds no writable place and the import fails.
    """
    _needs_mount_namespaces()
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "HOME": "/"}
    spec = {"writable": [str(tmp_path)], "env": env}
    process = _launch(
        spec, sys.executable, "-c", "import eventstore._foldkernel",
        env={"PATH": os.environ["PATH"]}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "no locator available" in out.decode()
