"""
``pseudonymize``: user ids become keyed HMAC-SHA256 pseudonyms before anything is stored.

A user id ``u`` is stored as ``"p:" + hex(HMAC-SHA256(key, utf8(u)))[:hex_chars]``
(32 hex characters, 128 bits, by default). The ``p:`` prefix makes pseudonyms
recognizable in a dump of the log; it is not a signal the plugin trusts: an id that
arrives already looking like a pseudonym is mapped like any other, so raw input never
passes through unchanged. Every event that carries a user (interactions, impressions,
``forget``) is mapped in :meth:`Pseudonymize.ingest`, and :meth:`Pseudonymize.user_id`
maps the ids of socket requests (``rank``, ``explain``, ``user``, ``forget``) the same
way, so applications only ever handle raw ids and the daemon only ever stores,
counts and logs pseudonyms. Whoever holds the key can map a raw id to its pseudonym
(that is what the daemon does), so pseudonymized data is still personal data for the
operator; without the key a pseudonym reveals nothing.

The key, in this order:

1. ``key_file``, when set: that file (a path; relative to the working directory).
2. The systemd credential ``credential`` (``$CREDENTIALS_DIRECTORY/<credential>``,
   ``LoadCredential=`` in the unit), when the service was given it.
3. ``<data_dir>/pseudonymize.key``: generated on the first start (32 random bytes
   written as 64 hex characters, mode 0600) unless ``generate = false``, and read on
   every later start. The log says where it is; back it up with the data.

The key is the file's bytes less a trailing newline, at least 32 of them
(``openssl rand -hex 32 > FILE`` makes one). Files other than credentials must not be
accessible by group or others (like ssh's private keys). No key material is ever
logged or put in an error message.

Changing the key (or ``hex_chars``) changes every pseudonym, and the state and the log
are keyed by pseudonyms: the daemon refuses to start or reload with a mapping other
than the one its log was written with (README, "Key rotation").
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final

import msgspec
import structlog

from eventstore.schema import Event
from plugins.base import PluginError
from plugins.context import PluginContext
from plugins.params import check_bool, check_int, check_str, param_error

__all__ = [
    "DEFAULT_CREDENTIAL",
    "GENERATED_KEY_FILE",
    "MIN_KEY_BYTES",
    "PREFIX",
    "Pseudonymize",
]

#: What every pseudonym starts with.
PREFIX: Final = "p:"
#: The shortest key accepted, in bytes.
MIN_KEY_BYTES: Final = 32
#: The key generated on the embedded default, under [store].data_dir.
GENERATED_KEY_FILE: Final = "pseudonymize.key"
#: The systemd credential looked for (systemd/rerankd.service's LoadCredential=).
DEFAULT_CREDENTIAL: Final = "rerankd-hmac-key"
_NAME: Final = "pseudonymize"
_log = structlog.get_logger("plugins.pseudonymize")


class Pseudonymize:
    """
    Replace user ids by keyed HMAC-SHA256 pseudonyms (see the module docstring).

    Args:
        key_file: the key's file; empty: the credential, else the generated key.
        credential: the systemd credential holding the key.
        generate: create ``<data_dir>/pseudonymize.key`` when no key is found;
            false makes a missing key an error.
        hex_chars: hex characters of the digest kept (16..64, even): 32 keep 128 bits,
            far beyond any collision between the users of one daemon.
        context: the daemon's data directory and credentials (from the registry).

    Raises:
        PluginError: a bad parameter, or a key that is missing, unreadable, too short
            or too widely readable; the message names ``[plugins.pseudonymize].<key>``.
    """

    name: ClassVar[str] = _NAME

    def __init__(
        self, *, key_file: str = "", credential: str = DEFAULT_CREDENTIAL,
        generate: bool = True, hex_chars: int = 32, context: PluginContext,
    ) -> None:  # fmt: skip
        key_file = check_str(_NAME, "key_file", key_file)
        credential = check_str(_NAME, "credential", credential, max_chars=255)
        generate = check_bool(_NAME, "generate", generate)
        self.hex_chars = check_int(_NAME, "hex_chars", hex_chars, lo=16, hi=64)
        if self.hex_chars % 2:
            raise param_error(_NAME, "hex_chars", "must be even", hex_chars)
        self._bytes_kept = self.hex_chars // 2
        found = _find_key(key_file=key_file, credential=credential, generate=generate,
                          context=context)  # fmt: skip
        #: Where the key came from, for the log: a path or a credential name, never the key.
        self.key_origin = found[1] if found else "none yet (dry run)"
        if found:
            _log.info("pseudonymize_key", origin=self.key_origin)
        # An HMAC with the key already absorbed: each id costs one copy and one update.
        self._template = hmac.new(found[0], digestmod="sha256") if found else None

    def __repr__(self) -> str:
        return f"Pseudonymize(hex_chars={self.hex_chars}, key from {self.key_origin})"

    def user_id(self, user: str) -> str:
        """The pseudonym of ``user``: ``"p:"`` + the first ``hex_chars`` hex digits."""
        template = self._template
        if template is None:
            msg = f"[plugins.{_NAME}]: built in a dry run without a key; it maps nothing"
            raise PluginError(msg)
        mac = template.copy()
        mac.update(user.encode())
        return PREFIX + mac.digest()[: self._bytes_kept].hex()

    def ingest(self, events: Sequence[Event]) -> list[Event]:
        """The events with every ``user`` replaced by its pseudonym (item events as they are)."""
        replace = msgspec.structs.replace
        seen: dict[str, str] = {}  # a batch often holds one user many times
        out: list[Event] = []
        for event in events:
            user = getattr(event, "user", None)
            if user is None:
                out.append(event)
                continue
            mapped = seen.get(user)
            if mapped is None:
                mapped = seen[user] = self.user_id(user)
            out.append(replace(event, user=mapped))
        return out

    def export(self, aggregates: Mapping[str, Any]) -> dict[str, Any]:
        """Aggregates carry no user ids: unchanged."""
        return dict(aggregates)


def _find_key(*, key_file: str, credential: str, generate: bool,
              context: PluginContext) -> tuple[bytes, str] | None:  # fmt: skip
    """The key and where it came from; None in a dry run that would generate one."""
    if key_file:
        return _read_key(Path(key_file), key="key_file", private=True), f"key_file {key_file}"
    passed = context.credential(credential)
    if passed is not None:
        # systemd owns the credential's permissions (readable by this service only)
        return _read_key(passed, key="credential", private=False), f"credential {credential}"
    path = context.data_dir / GENERATED_KEY_FILE
    if path.exists():
        return _read_key(path, key="", private=True), f"generated {path}"
    if not generate:
        msg = (f"[plugins.{_NAME}]: no key: key_file is empty, no credential {credential!r} "
               f"was passed to the service, and {path} does not exist; set key_file, pass the "
               "credential, or set generate = true")  # fmt: skip
        raise PluginError(msg)
    if context.dry_run:
        return None
    _generate_key(path)
    _log.warning("pseudonymize_key_generated", path=str(path),
                 hint="back this file up with the data: without it the stored pseudonyms "
                      "cannot be matched to user ids again")  # fmt: skip
    return _read_key(path, key="", private=True), f"generated {path}"


def _read_key(path: Path, *, key: str, private: bool) -> bytes:
    """
    The key in ``path``, checked.

    Errors name ``[plugins.pseudonymize].<key>``, or the table alone for the generated
    file, which no key names.
    """
    where = f"[plugins.{_NAME}]" + (f".{key}" if key else "")
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(1 << 16)
    except OSError as e:
        msg = f"{where}: cannot read the key file {path} ({e.strerror})"
        raise PluginError(msg) from None
    if private and mode & 0o077:
        msg = (f"{where}: the key file {path} is accessible by group or others "
               f"(mode {mode & 0o777:04o}); `chmod 600 {path}`")  # fmt: skip
        raise PluginError(msg)
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    if len(data) < MIN_KEY_BYTES:
        msg = (f"{where}: the key in {path} is {len(data)} bytes; at least {MIN_KEY_BYTES} "
               "are needed (`openssl rand -hex 32 > FILE` makes one)")  # fmt: skip
        raise PluginError(msg)
    return data


def _generate_key(path: Path) -> None:
    """
    Create ``path`` (mode 0600) holding a new random key, atomically.

    The key is written to a temporary file and hard-linked into place, so the key file
    is never seen half-written, and when two processes generate at once the first link
    wins and both then read the same key.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600, whatever the umask took away
        os.write(fd, secrets.token_hex(MIN_KEY_BYTES).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        with contextlib.suppress(FileExistsError):  # another process was first: its key stands
            os.link(tmp, path)
    finally:
        tmp.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the new name is durable before any pseudonym is
    finally:
        os.close(directory)
