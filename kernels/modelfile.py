"""
Model files: the encoder's parameters plus a manifest, in one safetensors file.

The tensors are the parameters of :mod:`kernels.sasrec`, one per dotted name (an
ensemble's with a leading member axis), each
float32, float16 or float64 (safetensors' numpy loader cannot read bfloat16, so it is
refused on save and on load). The safetensors metadata (``str -> str``) is the
manifest:

==================== ==========================================================
``format``           ``"rerankd-model"``
``format_version``   ``"1"``; a larger number was written by a newer rerankd
``model``            ``"sasrec"``
``hparams``          JSON object, ``SasrecConfig.to_dict()`` (a file from before
                     ``members`` existed lacks it: one member)
``vocab_size``       V, the number of items (decimal)
``vocab_fingerprint`` :func:`vocabulary_fingerprint` of the vocabulary (hex)
``vocabulary``       JSON list of the V external item ids in dense order: element
                     ``i`` is the item whose model index is ``i + 1`` (0 is padding)
``created_at``       ISO 8601 time in UTC
``extra``            optional JSON object, free-form (a training summary, say)
==================== ==========================================================

Loading checks everything it can before it reads a tensor: the manifest against
itself (the vocabulary against its size and fingerprint), the tensors' names, shapes
and dtypes against ``param_shapes(config)``, and the vocabulary against the one the
caller expects. Every refusal is a :class:`ModelFileError` whose message holds counts
and fingerprint prefixes but never an item id.

Never pickle: a safetensors file holds data only, so loading one runs no code.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import safetensors
import safetensors.numpy

from kernels.sasrec import SasrecConfig, param_shapes

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LoadedModel",
    "ModelFileError",
    "ModelManifest",
    "Reason",
    "load_model",
    "save_model",
    "vocabulary_fingerprint",
]

FORMAT: Final = "rerankd-model"
#: The newest manifest layout this rerankd writes and reads.
FORMAT_VERSION: Final = 1
_MODEL: Final = "sasrec"

#: safetensors dtype codes this module reads, and the numpy dtypes it writes.
_FILE_DTYPES: Final = frozenset({"F16", "F32", "F64"})
_ARRAY_DTYPES: Final = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: How many hex digits of a fingerprint a message shows.
_FP_SHOWN: Final = 8
#: How many offending tensor or key names a message lists.
_NAMES_SHOWN: Final = 3

Reason = Literal[
    "missing",
    "not_a_file",
    "corrupt",
    "unknown_format",
    "unknown_version",
    "newer_version",
    "unknown_model",
    "bad_manifest",
    "bad_vocabulary",
    "missing_tensors",
    "unexpected_tensors",
    "tensor_shape",
    "tensor_dtype",
    "vocabulary_mismatch",
]

_RETRAIN = "retrain with `rerankd train`"
_FIXES: Final[dict[Reason, str]] = {
    "missing": "check [model].path, or train a model with `rerankd train`",
    "not_a_file": "set [model].path to a model file, not a directory or device",
    "corrupt": f"the file is truncated or damaged; {_RETRAIN} or restore it from a backup",
    "unknown_format": "set [model].path to a model file written by `rerankd train`",
    "unknown_version": f"the manifest is damaged; {_RETRAIN}",
    "newer_version": f"it was made by a newer rerankd; upgrade rerankd or {_RETRAIN}",
    "unknown_model": f"upgrade rerankd or {_RETRAIN}",
    "bad_manifest": f"the manifest was altered or damaged; {_RETRAIN}",
    "bad_vocabulary": f"the vocabulary was altered or damaged; {_RETRAIN}",
    "missing_tensors": f"the tensors do not match the hyper-parameters; {_RETRAIN}",
    "unexpected_tensors": f"the tensors do not match the hyper-parameters; {_RETRAIN}",
    "tensor_shape": f"the tensors do not match the hyper-parameters; {_RETRAIN}",
    "tensor_dtype": f"this rerankd reads float32, float16 and float64 tensors; {_RETRAIN}",
    "vocabulary_mismatch": f"{_RETRAIN} or set [model].path to a matching file",
}


class ModelFileError(ValueError):
    """
    A model file cannot be used.

    It is missing, damaged, from another program or a newer rerankd, inconsistent, or
    trained for another vocabulary. The message is ``"model file <path>: <detail>;
    <fix>"``; it holds counts, tensor names and fingerprint prefixes, never an item id.

    Args:
        path: the model file.
        reason: what kind of problem; callers branch on it.
        detail: what exactly is wrong.
    """

    def __init__(self, path: str | os.PathLike[str], reason: Reason, detail: str) -> None:
        self.path = os.fspath(path)
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(f"model file {self.path}: {detail}; {_FIXES[reason]}")


@dataclasses.dataclass(frozen=True, slots=True)
class ModelManifest:
    """
    What a model file says about its parameters.

    ``vocabulary[i]`` is the external id of the item whose model index is ``i + 1``.
    The vocabulary is left out of ``repr`` (it is long, and ids may be personal data).
    """

    config: SasrecConfig
    vocabulary: tuple[str, ...] = dataclasses.field(repr=False)
    vocab_fingerprint: str
    created_at: str
    extra: Mapping[str, Any] | None = None
    model: str = _MODEL
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def vocab_size(self) -> int:
        """V, the number of items."""
        return len(self.vocabulary)

    def to_dict(self) -> dict[str, Any]:
        """The manifest as a JSON-able dict, keyed like the file's metadata."""
        return {
            "format": self.format,
            "format_version": self.format_version,
            "model": self.model,
            "hparams": self.config.to_dict(),
            "vocab_size": self.vocab_size,
            "vocab_fingerprint": self.vocab_fingerprint,
            "vocabulary": list(self.vocabulary),
            "created_at": self.created_at,
            "extra": None if self.extra is None else dict(self.extra),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedModel:
    """The parameters of a model file (name -> host array) and its manifest."""

    params: dict[str, np.ndarray] = dataclasses.field(repr=False)
    manifest: ModelManifest

    @property
    def config(self) -> SasrecConfig:
        """The encoder's hyper-parameters (``manifest.config``)."""
        return self.manifest.config


# ----------------------------------------------------------------------------- pure


def vocabulary_fingerprint(item_ids: Sequence[str]) -> str:
    """
    A stable digest of the item ids and their order.

    The SHA-256 hex digest of the ids in order, each encoded as its UTF-8 byte length
    (8 bytes, big-endian) followed by its UTF-8 bytes. The length prefix makes the
    encoding unambiguous (``["ab", "c"]`` and ``["a", "bc"]`` differ); the order
    matters, since it fixes the model indices.
    """
    digest = hashlib.sha256()
    for item in item_ids:
        raw = item.encode()
        digest.update(len(raw).to_bytes(8, "big"))
        digest.update(raw)
    return digest.hexdigest()


def _short(fingerprint: str) -> str:
    return f"{fingerprint[:_FP_SHOWN]}…"


def _names(names: set[str]) -> str:
    shown = ", ".join(repr(n) for n in sorted(names)[:_NAMES_SHOWN])
    return shown + (", ..." if len(names) > _NAMES_SHOWN else "")


def _check_vocabulary(vocabulary: Sequence[str], config: SasrecConfig) -> tuple[str, ...]:
    """The vocabulary as a tuple, or ValueError (the message counts, never quotes, ids)."""
    if isinstance(vocabulary, str):
        msg = "vocabulary: must be a sequence of item ids, got one str"
        raise TypeError(msg)
    items = tuple(vocabulary)
    if len(items) != config.num_items:
        msg = f"vocabulary: {len(items)} ids for a config with num_items={config.num_items}"
        raise ValueError(msg)
    if not all(isinstance(item, str) for item in items):
        msg = "vocabulary: every item id must be a str"
        raise TypeError(msg)
    if len(set(items)) != len(items):
        msg = f"vocabulary: {len(items) - len(set(items))} duplicate ids"
        raise ValueError(msg)
    return items


def _check_params(params: Mapping[str, Any], config: SasrecConfig) -> dict[str, np.ndarray]:
    """The parameters as contiguous host arrays, or ValueError naming the misfit."""
    shapes = param_shapes(config)
    missing, unexpected = shapes.keys() - params.keys(), params.keys() - shapes.keys()
    if missing or unexpected:
        missing_text, unexpected_text = _names(missing) or "none", _names(unexpected) or "none"
        msg = f"params: missing {missing_text}; unexpected {unexpected_text}"
        raise ValueError(msg)
    arrays = {name: np.ascontiguousarray(params[name]) for name in shapes}
    for name, array in arrays.items():
        if array.shape != shapes[name]:
            msg = f"params[{name!r}]: shape {array.shape}, the config needs {shapes[name]}"
            raise ValueError(msg)
        if array.dtype not in _ARRAY_DTYPES:
            msg = f"params[{name!r}]: dtype {array.dtype} (float32, float16 or float64 only)"
            raise TypeError(msg)
    return arrays


def _iso_utc(created_at: dt.datetime) -> str:
    if created_at.tzinfo is None:
        msg = "created_at: must be timezone-aware (a naive time is ambiguous)"
        raise ValueError(msg)
    return created_at.astimezone(dt.UTC).isoformat()


def _json_object(extra: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``extra`` as JSON would give it back (tuples become lists, keys strings)."""
    if extra is None:
        return None
    try:
        normalised: dict[str, Any] = json.loads(json.dumps(dict(extra)))
    except (TypeError, ValueError) as e:
        msg = "extra: must be a JSON-serialisable mapping"
        raise TypeError(msg) from e
    return normalised


def _build_manifest(
    config: SasrecConfig,
    vocabulary: Sequence[str],
    *,
    extra: Mapping[str, Any] | None,
    created_at: dt.datetime,
) -> ModelManifest:
    """The manifest of a model about to be saved; ValueError/TypeError on bad input."""
    items = _check_vocabulary(vocabulary, config)
    return ModelManifest(
        config=config,
        vocabulary=items,
        vocab_fingerprint=vocabulary_fingerprint(items),
        created_at=_iso_utc(created_at),
        extra=_json_object(extra),
    )


def _to_metadata(manifest: ModelManifest) -> dict[str, str]:
    """The manifest as safetensors metadata: every value a string."""
    meta = {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in manifest.to_dict().items()
        if value is not None
    }
    meta["format_version"] = str(manifest.format_version)
    meta["vocab_size"] = str(manifest.vocab_size)
    return meta


# ----------------------------------------------------------------- pure: reading


def _field(path: Path, meta: Mapping[str, str], key: str) -> str:
    if key not in meta:
        raise ModelFileError(path, "bad_manifest", f"the manifest has no {key!r} entry")
    return meta[key]


def _json_field(path: Path, meta: Mapping[str, str], key: str) -> Any:
    text = _field(path, meta, key)
    try:
        # RecursionError: json.loads raises it, not ValueError, on deep nesting.
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ModelFileError(path, "bad_manifest", f"{key!r} is not valid JSON") from e


def _natural(text: str) -> int | None:
    """``text`` as a non-negative int if it is 1 to 18 ASCII digits, else None."""
    # The length cap keeps int() clear of its 4300-digit limit (a plain ValueError).
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def _check_header(path: Path, meta: Mapping[str, str] | None) -> Mapping[str, str]:
    """The metadata, once it says rerankd-model, a known version and model sasrec."""
    if meta is None or meta.get("format") != FORMAT:
        detail = f"not a rerankd model (its format is not {FORMAT!r})"
        raise ModelFileError(path, "unknown_format", detail)
    version = _natural(meta.get("format_version", ""))
    if version is None or version < 1:
        raise ModelFileError(path, "unknown_version", "format_version is not a known version")
    if version > FORMAT_VERSION:
        detail = f"format_version {version} (this rerankd reads up to {FORMAT_VERSION})"
        raise ModelFileError(path, "newer_version", detail)
    if meta.get("model") != _MODEL:
        raise ModelFileError(path, "unknown_model", f"the model is not {_MODEL!r}")
    return meta


#: Annotation of a SasrecConfig field -> the JSON types its value may have. A new
#: kind of field fails loudly here (KeyError) rather than loading unchecked.
_JSON_TYPES: Final[dict[str, tuple[type, ...]]] = {"int": (int,), "float": (int, float)}


def _hparam_types() -> dict[str, tuple[type, ...]]:
    """SasrecConfig field -> the JSON types it accepts (bool is refused separately)."""
    return {
        f.name: _JSON_TYPES[f.type if isinstance(f.type, str) else f.type.__name__]
        for f in dataclasses.fields(SasrecConfig)
    }


#: Fields added to SasrecConfig after files were written: a file without one has the
#: value it had before the field existed.
_LATER_HPARAMS: Final[dict[str, int]] = {"members": 1}


def _parse_config(path: Path, meta: Mapping[str, str]) -> SasrecConfig:
    """The hyper-parameters: every field present (but later ones), of its type, and valid."""
    raw = _json_field(path, meta, "hparams")
    types = _hparam_types()
    if isinstance(raw, dict):
        raw = {**{k: v for k, v in _LATER_HPARAMS.items() if k not in raw}, **raw}
    if not isinstance(raw, dict) or raw.keys() != types.keys():
        detail = f"hparams is not an object with exactly the keys {sorted(types)}"
        raise ModelFileError(path, "bad_manifest", detail)
    wrong = {k for k, v in raw.items() if isinstance(v, bool) or not isinstance(v, types[k])}
    if wrong:
        raise ModelFileError(path, "bad_manifest", f"hparams has bad types for {_names(wrong)}")
    try:
        return SasrecConfig(**raw)
    except ValueError as e:
        raise ModelFileError(path, "bad_manifest", f"hparams are invalid ({e})") from e


def _parse_vocabulary(
    path: Path, meta: Mapping[str, str], config: SasrecConfig
) -> tuple[tuple[str, ...], str]:
    """(vocabulary, fingerprint), checked against vocab_size, num_items and each other."""
    size = _natural(_field(path, meta, "vocab_size"))
    items = _json_field(path, meta, "vocabulary")
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ModelFileError(path, "bad_vocabulary", "vocabulary is not a JSON list of strings")
    if size != len(items) or size != config.num_items:
        detail = f"vocabulary has {len(items)} ids, vocab_size and hparams.num_items disagree"
        raise ModelFileError(path, "bad_vocabulary", detail)
    if len(set(items)) != len(items):
        detail = f"vocabulary has {len(items) - len(set(items))} duplicate ids"
        raise ModelFileError(path, "bad_vocabulary", detail)
    stored = _field(path, meta, "vocab_fingerprint")
    actual = _fingerprint_or_none(items)
    if actual != stored:
        computed = "?" if actual is None else _short(actual)
        detail = f"the vocabulary's fingerprint is {computed}, the manifest says {_short(stored)}"
        raise ModelFileError(path, "bad_vocabulary", detail)
    return tuple(items), stored


def _fingerprint_or_none(items: Sequence[str]) -> str | None:
    """The fingerprint, or None when an id is not encodable (a lone surrogate)."""
    try:
        return vocabulary_fingerprint(items)
    except UnicodeEncodeError:
        return None


def _parse_extra(path: Path, meta: Mapping[str, str]) -> dict[str, Any] | None:
    if "extra" not in meta:
        return None
    extra = _json_field(path, meta, "extra")
    if not isinstance(extra, dict):
        raise ModelFileError(path, "bad_manifest", "'extra' is not a JSON object")
    return extra


def _parse_created_at(path: Path, meta: Mapping[str, str]) -> str:
    text = _field(path, meta, "created_at")
    try:
        dt.datetime.fromisoformat(text)
    except ValueError as e:
        raise ModelFileError(path, "bad_manifest", "created_at is not an ISO time") from e
    return text


def _parse_manifest(path: Path, meta: Mapping[str, str] | None) -> ModelManifest:
    """The manifest of a file, checked against itself; ModelFileError if it is not."""
    meta = _check_header(path, meta)
    config = _parse_config(path, meta)
    vocabulary, fingerprint = _parse_vocabulary(path, meta, config)
    return ModelManifest(
        config=config,
        vocabulary=vocabulary,
        vocab_fingerprint=fingerprint,
        created_at=_parse_created_at(path, meta),
        extra=_parse_extra(path, meta),
    )


def _check_tensors(
    path: Path, specs: Mapping[str, tuple[str, tuple[int, ...]]], config: SasrecConfig
) -> None:
    """The file's tensors (name -> (dtype code, shape)) are exactly what config needs."""
    shapes = param_shapes(config)
    if missing := shapes.keys() - specs.keys():
        detail = f"{len(missing)} tensors are missing: {_names(missing)}"
        raise ModelFileError(path, "missing_tensors", detail)
    if unexpected := specs.keys() - shapes.keys():
        detail = f"{len(unexpected)} tensors are unexpected: {_names(unexpected)}"
        raise ModelFileError(path, "unexpected_tensors", detail)
    for name, (dtype, shape) in specs.items():
        if shape != shapes[name]:
            detail = f"tensor {name!r} has shape {shape}, the hyper-parameters need {shapes[name]}"
            raise ModelFileError(path, "tensor_shape", detail)
        if dtype not in _FILE_DTYPES:
            raise ModelFileError(path, "tensor_dtype", f"tensor {name!r} has dtype {dtype}")


def _describe(size: int | None, fingerprint: str | None) -> str:
    text = "a vocabulary" if size is None else f"{size} items"
    return text + ("" if fingerprint is None else f" (fingerprint {_short(fingerprint)})")


def _check_expected(
    path: Path, manifest: ModelManifest, *, fingerprint: str | None, size: int | None
) -> None:
    """The model's vocabulary is the one the caller has (the parts it gave)."""
    if (size is None or size == manifest.vocab_size) and (
        fingerprint is None or fingerprint == manifest.vocab_fingerprint
    ):
        return
    detail = (
        f"trained for a vocabulary of {_describe(manifest.vocab_size, manifest.vocab_fingerprint)},"
        f" the store has {_describe(size, fingerprint)}"
    )
    raise ModelFileError(path, "vocabulary_mismatch", detail)


# ---------------------------------------------------------------------------- files


def _serialize(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    try:
        return safetensors.numpy.save(tensors, metadata=metadata)
    except safetensors.SafetensorError as e:
        # The one failure here that is the caller's: a header over safetensors' 100 MB.
        msg = f"cannot serialise the model ({e}); is the vocabulary too large for a header?"
        raise ValueError(msg) from e


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """
    Write ``path`` so that readers see the old file or the new one, never a part.

    A temporary file next to ``path`` is written and fsynced, renamed over ``path``,
    and then the directory is fsynced so that the rename survives a crash.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # O_EXCL: never write into a file someone else made. Mode 0o666: the umask decides
    # the final mode (safetensors' own save_file makes 0o600 files, which a daemon
    # running as another user cannot read).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def save_model(
    path: str | os.PathLike[str],
    params: Mapping[str, Any],
    config: SasrecConfig,
    *,
    vocabulary: Sequence[str],
    extra: Mapping[str, Any] | None = None,
    created_at: dt.datetime | None = None,
) -> ModelManifest:
    """
    Write ``params`` with their manifest to ``path``, atomically.

    Args:
        path: the model file; replaced if it exists.
        params: exactly the names and shapes of ``param_shapes(config)``, as numpy or
            JAX arrays of float32, float16 or float64.
        config: the encoder's hyper-parameters.
        vocabulary: the ``config.num_items`` unique external item ids, in dense order.
        extra: a JSON-serialisable mapping stored as is (a training summary, say).
        created_at: a timezone-aware time; now when omitted.

    Returns:
        The manifest written, equal to the one :func:`load_model` will read back.

    Raises:
        ValueError: params, vocabulary or created_at do not fit; nothing is written.
        TypeError: a parameter, id or ``extra`` has the wrong type; nothing is written.
        OSError: the write failed; an existing file at ``path`` is untouched.
    """
    arrays = _check_params(params, config)
    when = dt.datetime.now(dt.UTC) if created_at is None else created_at
    manifest = _build_manifest(config, vocabulary, extra=extra, created_at=when)
    _write_atomically(Path(path), _serialize(arrays, _to_metadata(manifest)))
    return manifest


def _open(path: Path) -> Any:
    """An open safetensors reader, or ModelFileError (missing, not a file, corrupt)."""
    if not path.exists():
        raise ModelFileError(path, "missing", "no such file")
    if not path.is_file():
        raise ModelFileError(path, "not_a_file", "not a regular file")
    try:
        return safetensors.safe_open(path, framework="np")
    except FileNotFoundError as e:
        raise ModelFileError(path, "missing", "no such file") from e
    except (safetensors.SafetensorError, OSError) as e:
        raise ModelFileError(path, "corrupt", f"not a readable safetensors file ({e})") from e


def load_model(
    path: str | os.PathLike[str],
    *,
    expect_vocab_fingerprint: str | None = None,
    expect_vocab_size: int | None = None,
) -> LoadedModel:
    """
    Read and check a model file.

    Args:
        path: the model file.
        expect_vocab_fingerprint: the :func:`vocabulary_fingerprint` the caller's
            vocabulary has; None to accept any.
        expect_vocab_size: the number of items the caller has; None to accept any.

    Returns:
        The parameters, in ``param_shapes`` order, and the manifest.

    Raises:
        ModelFileError: the file is missing, damaged, not a rerankd model, from a
            newer rerankd, inconsistent, or trained for another vocabulary.
    """
    path = Path(path)
    with _open(path) as reader:
        manifest = _parse_manifest(path, reader.metadata())
        specs = {
            name: (reader.get_slice(name).get_dtype(), tuple(reader.get_slice(name).get_shape()))
            for name in reader.keys()  # noqa: SIM118 (a reader, not a dict)
        }
        _check_tensors(path, specs, manifest.config)
        _check_expected(
            path, manifest, fingerprint=expect_vocab_fingerprint, size=expect_vocab_size
        )
        params = {name: reader.get_tensor(name) for name in param_shapes(manifest.config)}
    return LoadedModel(params=params, manifest=manifest)
