"""
`kernels.modelfile`: round trips, every refusal on load and on save, the vocabulary
fingerprint, and atomic replacement.

Bad files are built with safetensors directly from a good file's tensors and metadata,
so each case changes exactly one thing.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.modelfile import (
    FORMAT_VERSION,
    LoadedModel,
    ModelFileError,
    ModelManifest,
    load_model,
    save_model,
    vocabulary_fingerprint,
)
from kernels.sasrec import SasrecConfig, encode_users, init_params, param_shapes

if TYPE_CHECKING:
    from collections.abc import Callable

CONFIG = SasrecConfig(num_items=20, max_len=8, dim=16, num_blocks=2, num_heads=2)
#: Distinctive ids, so that "no item id in the message" is a meaningful check.
VOCABULARY = tuple(f"sku-{i:03d}-zq" for i in range(CONFIG.num_items))
CREATED_AT = dt.datetime(2026, 11, 27, 12, 30, tzinfo=dt.UTC)
EXTRA = {"report": {"ndcg@10": 0.25, "epochs": 3}, "tags": ["nightly"]}


def reference_fingerprint(item_ids: list[str] | tuple[str, ...]) -> str:
    """The documented definition, written out independently of the module."""
    data = b"".join(len(i.encode()).to_bytes(8, "big") + i.encode() for i in item_ids)
    return hashlib.sha256(data).hexdigest()


def assert_no_item_id(message: str) -> None:
    """No vocabulary entry appears in ``message``."""
    assert [] == [item for item in VOCABULARY if item in message]


@pytest.fixture(name="params", scope="module")
def fixture_params() -> dict[str, jax.Array]:
    return init_params(jax.random.key(0), CONFIG)


@pytest.fixture(name="model_path")
def fixture_model_path(tmp_path: Path, params: dict[str, jax.Array]) -> Path:
    path = tmp_path / "model.safetensors"
    save_model(path, params, CONFIG, vocabulary=VOCABULARY, extra=EXTRA, created_at=CREATED_AT)
    return path


@pytest.fixture(name="loaded")
def fixture_loaded(model_path: Path) -> LoadedModel:
    return load_model(model_path)


# ------------------------------------------------------------------------ round trip


def test_round_trip_tensors_are_bit_identical(
    params: dict[str, jax.Array], loaded: LoadedModel
) -> None:
    """Every tensor comes back with the same name, dtype and bits."""
    expected = {name: (np.dtype(np.float32), True) for name in param_shapes(CONFIG)}
    actual = {
        name: (array.dtype, np.array_equal(np.asarray(params[name]), array))
        for name, array in loaded.params.items()
    }
    assert expected == actual


def test_round_trip_config(loaded: LoadedModel) -> None:
    """The hyper-parameters come back equal, also through the manifest."""
    assert (CONFIG, CONFIG) == (loaded.config, loaded.manifest.config)


def test_round_trip_vocabulary_and_fingerprint(loaded: LoadedModel) -> None:
    """The vocabulary comes back as a tuple in order, with its fingerprint and size."""
    expected = (VOCABULARY, vocabulary_fingerprint(VOCABULARY), len(VOCABULARY))
    manifest = loaded.manifest
    assert expected == (manifest.vocabulary, manifest.vocab_fingerprint, manifest.vocab_size)


def test_round_trip_extra_and_created_at(loaded: LoadedModel) -> None:
    """`extra` and the creation time (as ISO UTC) are preserved."""
    expected = (EXTRA, "2026-11-27T12:30:00+00:00")
    assert expected == (loaded.manifest.extra, loaded.manifest.created_at)


def test_save_returns_the_manifest_load_reads(tmp_path: Path, params: dict[str, jax.Array]) -> None:
    """save_model's manifest equals load_model's, `extra` normalised as JSON gives it."""
    path = tmp_path / "m.safetensors"
    written = save_model(path, params, CONFIG, vocabulary=VOCABULARY, extra={"t": (1, 2)})
    assert (ModelManifest, written) == (type(written), load_model(path).manifest)
    assert {"t": [1, 2]} == written.extra


def test_an_ensemble_round_trips(tmp_path: Path) -> None:
    """A 2-member model: its config, its member-axis tensors and its user vectors."""
    config = SasrecConfig(num_items=20, max_len=8, dim=16, num_blocks=2, num_heads=2, members=2)
    params = init_params(jax.random.key(4), config)
    path = tmp_path / "ensemble.safetensors"
    save_model(path, params, config, vocabulary=VOCABULARY)
    loaded = load_model(path)
    assert (loaded.manifest.config, loaded.params["item_emb"].shape) == (config, (2, 21, 16))
    seqs = np.array([[0, 0, 0, 0, 3, 1, 4, 1]], np.int32)
    np.testing.assert_array_equal(
        np.asarray(encode_users(params, seqs, config=config)),
        np.asarray(encode_users(loaded.params, seqs, config=loaded.manifest.config)),
    )


def test_a_file_from_before_members_is_one_member(model_path: Path) -> None:
    """hparams written before the field existed (no "members") load as one member."""
    with_meta(hparams=hparams_without("members"))(model_path)
    assert CONFIG == load_model(model_path).manifest.config
    assert 1 == load_model(model_path).manifest.config.members


def test_round_trip_encoder_output(params: dict[str, jax.Array], loaded: LoadedModel) -> None:
    """The encoder gives bit-identical user vectors with the loaded parameters."""
    seqs = jnp.array([[0, 0, 0, 0, 0, 3, 7, 1], [1, 2, 3, 4, 5, 6, 7, 20], [0] * 8])
    expected = np.asarray(encode_users(params, seqs, config=CONFIG))
    actual = np.asarray(encode_users(loaded.params, seqs, config=CONFIG))
    assert (True, expected.dtype) == (np.array_equal(expected, actual), actual.dtype)


def test_manifest_to_dict_is_json_and_matches_metadata(model_path: Path) -> None:
    """to_dict() is JSON-able and, stringified, is exactly the file's metadata."""
    manifest = load_model(model_path).manifest
    as_dict = json.loads(json.dumps(manifest.to_dict()))
    stringified = {k: v if isinstance(v, str) else json.dumps(v) for k, v in as_dict.items()}
    with safetensors.safe_open(model_path, framework="np") as reader:
        assert reader.metadata() == stringified


def test_repr_leaves_out_the_vocabulary(loaded: LoadedModel) -> None:
    """Neither the manifest's nor the loaded model's repr shows item ids or tensors."""
    assert_no_item_id(repr(loaded))
    assert "array" not in repr(loaded)


def test_round_trip_float16_and_float64(tmp_path: Path, params: dict[str, jax.Array]) -> None:
    """float16 and float64 parameters keep their dtype."""
    mixed = {
        name: np.asarray(value, np.float16 if i % 2 else np.float64)
        for i, (name, value) in enumerate(params.items())
    }
    path = tmp_path / "m.safetensors"
    save_model(path, mixed, CONFIG, vocabulary=VOCABULARY)
    expected = {name: value.dtype for name, value in mixed.items()}
    assert expected == {name: value.dtype for name, value in load_model(path).params.items()}


# ---------------------------------------------------------------------- expectations


def test_matching_expectations_load(model_path: Path) -> None:
    """The right size and fingerprint are accepted."""
    loaded = load_model(
        model_path,
        expect_vocab_size=len(VOCABULARY),
        expect_vocab_fingerprint=vocabulary_fingerprint(VOCABULARY),
    )
    assert VOCABULARY == loaded.manifest.vocabulary


STORE_VOCABULARY = (*VOCABULARY, "sku-new-zq")


@pytest.mark.parametrize(
    ("size", "fingerprint", "store_text"),
    [
        pytest.param(
            len(STORE_VOCABULARY),
            vocabulary_fingerprint(STORE_VOCABULARY),
            f"21 items (fingerprint {vocabulary_fingerprint(STORE_VOCABULARY)[:8]}…)",
            id="size-and-fingerprint",
        ),
        pytest.param(
            None,
            vocabulary_fingerprint(VOCABULARY[::-1]),
            f"a vocabulary (fingerprint {vocabulary_fingerprint(VOCABULARY[::-1])[:8]}…)",
            id="fingerprint-only",
        ),
        pytest.param(21, None, "21 items", id="size-only"),
    ],
)
def test_mismatched_vocabulary_is_refused(
    model_path: Path, size: int | None, fingerprint: str | None, store_text: str
) -> None:
    """
    A model trained for another vocabulary is refused; the message names the file,
    both sizes and fingerprint prefixes and the fix, and no item id.
    """
    with pytest.raises(ModelFileError) as caught:
        load_model(model_path, expect_vocab_size=size, expect_vocab_fingerprint=fingerprint)
    model_text = f"20 items (fingerprint {vocabulary_fingerprint(VOCABULARY)[:8]}…)"
    expected = (
        f"model file {model_path}: trained for a vocabulary of {model_text}, the store has"
        f" {store_text}; retrain with `rerankd train` or set [model].path to a matching file"
    )
    assert ("vocabulary_mismatch", str(model_path)) == (caught.value.reason, caught.value.path)
    assert expected == str(caught.value)
    assert_no_item_id(str(caught.value))


# ----------------------------------------------------------------------- bad files


def read_good(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A good model file's tensors and metadata, to be spoiled."""
    with safetensors.safe_open(path, framework="np") as reader:
        tensors = {name: reader.get_tensor(name) for name in reader.keys()}  # noqa: SIM118 (a reader, not a dict)
        return tensors, dict(reader.metadata())


def with_meta(**changes: str | None) -> Callable[[Path], None]:
    """A spoiler that sets (or, for None, deletes) metadata entries."""

    def spoil(path: Path) -> None:
        tensors, meta = read_good(path)
        meta |= {k: v for k, v in changes.items() if v is not None}
        for key in [k for k, v in changes.items() if v is None]:
            del meta[key]
        safetensors.numpy.save_file(tensors, path, metadata=meta)

    return spoil


def with_tensors(change: Callable[[dict[str, np.ndarray]], None]) -> Callable[[Path], None]:
    """A spoiler that edits the tensor dict in place."""

    def spoil(path: Path) -> None:
        tensors, meta = read_good(path)
        change(tensors)
        safetensors.numpy.save_file(tensors, path, metadata=meta)

    return spoil


def without_metadata(path: Path) -> None:
    tensors, _ = read_good(path)
    safetensors.numpy.save_file(tensors, path)


def swapped_vocabulary(path: Path) -> None:
    """Two ids swapped, fingerprint left alone: the indices would point at wrong items."""
    items = list(VOCABULARY)
    items[0], items[1] = items[1], items[0]
    with_meta(vocabulary=json.dumps(items))(path)


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def replaced_by_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def hparams_with(**changes: Any) -> str:
    return json.dumps(CONFIG.to_dict() | changes)


def hparams_without(key: str) -> str:
    return json.dumps({k: v for k, v in CONFIG.to_dict().items() if k != key})


def reshaped_pos_emb(tensors: dict[str, np.ndarray]) -> None:
    tensors["pos_emb"] = np.zeros((CONFIG.max_len + 1, CONFIG.dim), np.float32)


def bfloat16_bias(tensors: dict[str, np.ndarray]) -> None:
    tensors["ln_final.bias"] = tensors["ln_final.bias"].astype(jnp.bfloat16)


def int32_bias(tensors: dict[str, np.ndarray]) -> None:
    tensors["ln_final.bias"] = tensors["ln_final.bias"].astype(np.int32)


BAD_FILES = [
    pytest.param(Path.unlink, "missing", "no such file", id="missing"),
    pytest.param(replaced_by_directory, "not_a_file", "not a regular file", id="directory"),
    pytest.param(truncated, "corrupt", "not a readable safetensors file", id="truncated"),
    pytest.param(lambda p: p.write_bytes(b""), "corrupt", "not a readable", id="empty"),
    pytest.param(
        lambda p: p.write_bytes(b"\x01garbage, not a model" * 40), "corrupt", "not a", id="garbage"
    ),
    pytest.param(with_meta(format="keras"), "unknown_format", "not a rerankd", id="format"),
    pytest.param(without_metadata, "unknown_format", "not a rerankd model", id="no-metadata"),
    pytest.param(
        with_meta(format_version="2"), "newer_version", "format_version 2 (", id="newer-version"
    ),
    pytest.param(with_meta(format_version="1.0"), "unknown_version", "", id="version-text"),
    pytest.param(with_meta(format_version="0"), "unknown_version", "", id="version-zero"),
    pytest.param(with_meta(model="bert"), "unknown_model", "not 'sasrec'", id="model"),
    pytest.param(with_meta(hparams="{"), "bad_manifest", "'hparams' is not valid", id="hp-json"),
    pytest.param(
        with_meta(hparams=hparams_without("num_heads")), "bad_manifest", "keys", id="hp-missing"
    ),
    pytest.param(
        with_meta(hparams=hparams_with(layers=3)), "bad_manifest", "keys", id="hp-unknown"
    ),
    pytest.param(with_meta(hparams=hparams_with(dim=16.0)), "bad_manifest", "'dim'", id="hp-type"),
    pytest.param(
        with_meta(hparams=hparams_with(dropout=1.5)), "bad_manifest", "invalid", id="hp-value"
    ),
    pytest.param(with_meta(hparams=hparams_with(dim=8)), "tensor_shape", "", id="hp-shape"),
    pytest.param(
        with_meta(hparams=hparams_with(members=2)), "tensor_shape", "(2, ", id="hp-members"
    ),
    pytest.param(
        with_meta(hparams=hparams_with(members=0)), "bad_manifest", "members", id="hp-no-members"
    ),
    pytest.param(
        with_meta(hparams=hparams_with(num_items=21), vocab_size="21"),
        "bad_vocabulary",
        "20 ids",
        id="hp-num-items",
    ),
    pytest.param(swapped_vocabulary, "bad_vocabulary", "fingerprint is", id="vocab-tampered"),
    pytest.param(with_meta(vocab_size="19"), "bad_vocabulary", "20 ids", id="vocab-size"),
    pytest.param(with_meta(vocabulary="[1, 2]"), "bad_vocabulary", "strings", id="vocab-type"),
    pytest.param(
        with_meta(vocabulary=json.dumps([VOCABULARY[0]] * 20)),
        "bad_vocabulary",
        "19 duplicate",
        id="vocab-duplicates",
    ),
    pytest.param(
        with_meta(vocab_fingerprint=None), "bad_manifest", "no 'vocab_fingerprint'", id="no-fp"
    ),
    pytest.param(with_meta(hparams=None), "bad_manifest", "no 'hparams' entry", id="no-hparams"),
    pytest.param(with_meta(vocabulary=None), "bad_manifest", "no 'vocabulary'", id="no-vocab"),
    pytest.param(with_meta(vocab_size="9" * 5000), "bad_vocabulary", "disagree", id="huge-size"),
    pytest.param(
        with_meta(vocabulary="[" * 100_000), "bad_manifest", "not valid JSON", id="deep-json"
    ),
    pytest.param(with_meta(created_at="yesterday"), "bad_manifest", "ISO", id="created-at"),
    pytest.param(with_meta(extra="[]"), "bad_manifest", "'extra'", id="extra-type"),
    pytest.param(
        with_tensors(reshaped_pos_emb), "tensor_shape", "'pos_emb' has shape (9, 16)", id="shape"
    ),
    pytest.param(
        with_tensors(lambda t: t.pop("block1.ffn.w2")),
        "missing_tensors",
        "1 tensors are missing: 'block1.ffn.w2'",
        id="missing-tensor",
    ),
    pytest.param(
        with_tensors(lambda t: t.update(head=np.zeros(3, np.float32))),
        "unexpected_tensors",
        "1 tensors are unexpected: 'head'",
        id="extra-tensor",
    ),
    pytest.param(with_tensors(bfloat16_bias), "tensor_dtype", "dtype BF16", id="bfloat16"),
    pytest.param(with_tensors(int32_bias), "tensor_dtype", "dtype I32", id="int32"),
]


@pytest.mark.parametrize(("spoil", "reason", "detail_part"), BAD_FILES)
def test_bad_file_is_refused(
    model_path: Path, spoil: Callable[[Path], object], reason: str, detail_part: str
) -> None:
    """
    Each kind of bad file is refused with its own reason; the message starts with the
    file, holds what is wrong, and never an item id.
    """
    spoil(model_path)
    with pytest.raises(ModelFileError) as caught:
        load_model(model_path)
    error = caught.value
    assert (reason, str(model_path), True) == (
        error.reason,
        error.path,
        detail_part in error.detail,
    )
    prefix = f"model file {model_path}: {error.detail}; "
    assert prefix == str(error)[: len(prefix)]
    assert_no_item_id(str(error))


def test_newer_version_message_says_upgrade(model_path: Path) -> None:
    """A file from a newer rerankd says so and tells the user to upgrade or retrain."""
    with_meta(format_version=str(FORMAT_VERSION + 1))(model_path)
    with pytest.raises(ModelFileError) as caught:
        load_model(model_path)
    expected = (
        f"model file {model_path}: format_version 2 (this rerankd reads up to 1); it was"
        " made by a newer rerankd; upgrade rerankd or retrain with `rerankd train`"
    )
    assert expected == str(caught.value)


def test_model_file_error_is_a_value_error() -> None:
    """Callers that catch ValueError also catch ModelFileError."""
    assert issubclass(ModelFileError, ValueError)


# ----------------------------------------------------------------- refused on save


def drop(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda p: {k: v for k, v in p.items() if k != name}


BAD_PARAMS = [
    pytest.param(drop("pos_emb"), ValueError, "missing 'pos_emb'", id="missing"),
    pytest.param(lambda p: p | {"head": np.zeros(2)}, ValueError, "unexpected 'head'", id="extra"),
    pytest.param(
        lambda p: p | {"pos_emb": np.zeros((9, 16), np.float32)},
        ValueError,
        r"params\['pos_emb'\]: shape \(9, 16\), the config needs \(8, 16\)",
        id="shape",
    ),
    pytest.param(
        lambda p: p | {"ln_final.bias": np.zeros(16, jnp.bfloat16)},
        TypeError,
        "dtype bfloat16",
        id="bfloat16",
    ),
    pytest.param(
        lambda p: p | {"ln_final.bias": np.zeros(16, np.int32)}, TypeError, "int32", id="int32"
    ),
]


@pytest.mark.parametrize(("spoil", "error", "match"), BAD_PARAMS)
def test_save_refuses_params_that_do_not_fit(
    tmp_path: Path,
    params: dict[str, jax.Array],
    spoil: Callable[[dict[str, Any]], dict[str, Any]],
    error: type[Exception],
    match: str,
) -> None:
    """Parameters without exactly the config's names, shapes and float dtypes are refused."""
    with pytest.raises(error, match=match):
        save_model(tmp_path / "m.safetensors", spoil(params), CONFIG, vocabulary=VOCABULARY)
    assert [] == list(tmp_path.iterdir())


BAD_VOCABULARIES = [
    pytest.param(VOCABULARY[:-1], ValueError, "19 ids for a config with num_items=20", id="short"),
    pytest.param((*VOCABULARY, "x"), ValueError, "21 ids", id="long"),
    pytest.param((*VOCABULARY[:-1], VOCABULARY[0]), ValueError, "1 duplicate ids", id="dup"),
    pytest.param((*VOCABULARY[:-1], 7), TypeError, "must be a str", id="not-str"),
    pytest.param("x" * 20, TypeError, "got one str", id="one-str"),
]


@pytest.mark.parametrize(("vocabulary", "error", "match"), BAD_VOCABULARIES)
def test_save_refuses_bad_vocabulary(
    tmp_path: Path,
    params: dict[str, jax.Array],
    vocabulary: Any,
    error: type[Exception],
    match: str,
) -> None:
    """A vocabulary of the wrong length, with duplicates or non-str ids is refused."""
    with pytest.raises(error, match=match) as caught:
        save_model(tmp_path / "m.safetensors", params, CONFIG, vocabulary=vocabulary)
    assert_no_item_id(str(caught.value))
    assert [] == list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"created_at": dt.datetime(2026, 1, 1)}, ValueError, "aware", id="naive"),  # noqa: DTZ001 (naive on purpose)
        pytest.param({"extra": {"x": object()}}, TypeError, "JSON", id="extra"),
    ],
)
def test_save_refuses_bad_options(
    tmp_path: Path,
    params: dict[str, jax.Array],
    kwargs: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    """A naive creation time or a non-JSON `extra` is refused before anything is written."""
    with pytest.raises(error, match=match):
        save_model(tmp_path / "m.safetensors", params, CONFIG, vocabulary=VOCABULARY, **kwargs)
    assert [] == list(tmp_path.iterdir())


def test_save_translates_a_header_too_large(
    tmp_path: Path, params: dict[str, jax.Array], monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors' refusal to serialise (a header over 100 MB) becomes a ValueError."""

    def refuse(*_args: object, **_kwargs: object) -> bytes:
        msg = "Error while serializing: header too large"
        raise safetensors.SafetensorError(msg)

    monkeypatch.setattr(safetensors.numpy, "save", refuse)
    with pytest.raises(ValueError, match="vocabulary too large"):
        save_model(tmp_path / "m.safetensors", params, CONFIG, vocabulary=VOCABULARY)
    assert [] == list(tmp_path.iterdir())


# -------------------------------------------------------------------- fingerprint


def test_fingerprint_follows_the_documented_definition() -> None:
    """The fingerprint is sha256 over (8-byte big-endian UTF-8 length, UTF-8 bytes)*."""
    items = ["a", "bc", "", "é", "x" * 300]
    assert reference_fingerprint(items) == vocabulary_fingerprint(items)


def test_fingerprint_is_pinned() -> None:
    """Fixed values, so that a change of definition cannot pass unnoticed."""
    expected = (
        hashlib.sha256(b"").hexdigest(),
        hashlib.sha256(b"\x00\x00\x00\x00\x00\x00\x00\x01a").hexdigest(),
    )
    assert expected == (vocabulary_fingerprint([]), vocabulary_fingerprint(["a"]))


def test_fingerprint_is_stable_across_calls() -> None:
    """The same ids give the same fingerprint, from a list, a tuple or a fresh copy."""
    items = list(VOCABULARY)
    expected = vocabulary_fingerprint(VOCABULARY)
    assert [expected] * 3 == [
        vocabulary_fingerprint(items),
        vocabulary_fingerprint(tuple(items)),
        vocabulary_fingerprint([str(i) for i in items]),
    ]


def test_fingerprint_is_order_sensitive() -> None:
    """Reordering the ids changes the fingerprint (the indices would change)."""
    assert vocabulary_fingerprint(["a", "b"]) != vocabulary_fingerprint(["b", "a"])


@pytest.mark.parametrize(
    ("left", "right"),
    [(["ab", "c"], ["a", "bc"]), (["a", ""], ["a"]), ([""], []), (["a\x00b"], ["a", "b"])],
)
def test_fingerprint_is_unambiguous(left: list[str], right: list[str]) -> None:
    """Different lists with the same concatenation have different fingerprints."""
    assert vocabulary_fingerprint(left) != vocabulary_fingerprint(right)


# ------------------------------------------------------------------------- atomicity


def test_overwrite_leaves_no_temporary_file(model_path: Path, params: dict[str, jax.Array]) -> None:
    """Saving over a model replaces it and leaves only the model file behind."""
    new_vocabulary = VOCABULARY[::-1]
    save_model(model_path, params, CONFIG, vocabulary=new_vocabulary)
    assert [model_path.name] == [p.name for p in model_path.parent.iterdir()]
    assert new_vocabulary == load_model(model_path).manifest.vocabulary


def test_refused_save_leaves_the_old_file(model_path: Path, params: dict[str, jax.Array]) -> None:
    """A save refused by validation does not touch the existing file."""
    before = model_path.read_bytes()
    with pytest.raises(ValueError, match="missing"):
        save_model(model_path, drop("pos_emb")(params), CONFIG, vocabulary=VOCABULARY)
    assert (before, [model_path.name]) == (
        model_path.read_bytes(),
        [p.name for p in model_path.parent.iterdir()],
    )


def test_failed_fsync_leaves_the_old_file(
    model_path: Path, params: dict[str, jax.Array], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error while writing (fsync EIO) leaves the old file and no temporary file."""
    before = model_path.read_bytes()

    def failing_fsync(_fd: int) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="injected"):
        save_model(model_path, params, CONFIG, vocabulary=VOCABULARY[::-1])
    monkeypatch.undo()
    assert (before, [model_path.name]) == (
        model_path.read_bytes(),
        [p.name for p in model_path.parent.iterdir()],
    )


def test_new_file_mode_follows_the_umask(tmp_path: Path, params: dict[str, jax.Array]) -> None:
    """The model file gets 0o666 minus the umask, not a temporary file's 0o600."""
    old = os.umask(0o022)
    try:
        save_model(tmp_path / "m.safetensors", params, CONFIG, vocabulary=VOCABULARY)
    finally:
        os.umask(old)
    assert 0o644 == (tmp_path / "m.safetensors").stat().st_mode & 0o777


# ------------------------------------------------------------------------ property


@st.composite
def configs(draw: st.DrawFn) -> SasrecConfig:
    heads = draw(st.integers(1, 2))
    return SasrecConfig(
        num_items=draw(st.integers(1, 12)),
        max_len=draw(st.integers(1, 6)),
        dim=heads * draw(st.integers(1, 4)),
        num_blocks=draw(st.integers(1, 2)),
        num_heads=heads,
        ffn_dim=draw(st.integers(0, 6)),
        dropout=draw(st.floats(0.0, 1.0, exclude_max=True)),
    )


def random_params(config: SasrecConfig, seed: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """Arbitrary bit patterns (NaN payloads, infinities, -0.0 included) of each shape."""
    rng = np.random.default_rng(seed)
    return {
        name: rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
        .view(dtype)
        .reshape(shape)
        for name, shape in param_shapes(config).items()
    }


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()


DTYPES = st.sampled_from([np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)])


@settings(max_examples=40, deadline=None)
@given(
    config=configs(),
    data=st.data(),
    extra=st.none() | st.dictionaries(st.text(max_size=5), JSON_SCALARS, max_size=3),
    created_at=st.datetimes(timezones=st.just(dt.UTC)),
)
def test_round_trip_property(
    config: SasrecConfig,
    data: st.DataObject,
    extra: dict[str, Any] | None,
    created_at: dt.datetime,
) -> None:
    """For any small config, vocabulary and bits, load(save(x)) gives x back exactly."""
    n = config.num_items
    vocabulary = data.draw(st.lists(st.text(max_size=6), min_size=n, max_size=n, unique=True))
    params = random_params(config, data.draw(st.integers(0, 2**32 - 1)), data.draw(DTYPES))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.safetensors"
        written = save_model(
            path, params, config, vocabulary=vocabulary, extra=extra, created_at=created_at
        )
        loaded = load_model(path, expect_vocab_fingerprint=reference_fingerprint(vocabulary))
    expected = {name: (a.dtype, a.shape, a.tobytes()) for name, a in params.items()}
    actual = {name: (a.dtype, a.shape, a.tobytes()) for name, a in loaded.params.items()}
    assert expected == actual
    assert (written, config, tuple(vocabulary)) == (
        loaded.manifest,
        loaded.config,
        loaded.manifest.vocabulary,
    )
