"""
The compiled rank path: candidate ids parsed from JSON bytes, the byte-keyed catalogue,
and features, fused scores and top k, each against a plain Python/numpy version.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon._rankloops import features_batch, rank_batch_fused
from daemon.candidates import CandidateError, Candidates, Catalog
from eventstore import State, project
from eventstore.schema import Clicked, ItemUpdated, Purchased, Viewed

T = 1_764_250_000.0
_ascii_id = st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=20)
_any_id = st.text(min_size=1, max_size=12).filter(lambda s: 0 < len(s.encode()) <= 64)


def parse(raw: bytes, max_count: int = 1000, max_id_bytes: int = 64) -> Candidates:
    return Candidates.parse(raw, max_count=max_count, max_id_bytes=max_id_bytes)


# ---------------------------------------------------------------- parsing


@given(st.lists(_any_id, max_size=40), st.sampled_from([b"", b" ", b"\n\t ", b"\r\n"]))
@settings(max_examples=300, deadline=None)
def test_parse_gives_the_ids_msgspec_gives(ids: list[str], space: bytes) -> None:
    """Fast (ASCII) and slow (escapes, non-ASCII) forms both give exactly the decoded ids."""
    spaced = b"[" + space + (space + b"," + space).join(map(msgspec.json.encode, ids)) + b"]"
    cands = parse(space + spaced + space)
    assert ids == [cands.id(i) for i in range(len(cands))]
    assert ids == parse(msgspec.json.encode(ids)).ids()


@given(st.lists(_ascii_id, min_size=1, max_size=40))
@settings(max_examples=200, deadline=None)
def test_fast_form_points_into_the_request_bytes(ids: list[str]) -> None:
    """Printable-ASCII ids without escapes are offsets into the very bytes that arrived."""
    if any('"' in i or "\\" in i for i in ids):
        return  # those need escapes: the slow form, covered above
    raw = msgspec.json.encode(ids)
    cands = parse(raw)
    assert raw == cands.buf
    assert ids == [raw[s:e].decode() for s, e in zip(cands.starts, cands.ends, strict=True)]


@pytest.mark.parametrize(
    ("raw", "code", "words"),
    [
        (b'"a"', "bad_request", "expected a list of strings"),
        (b'["a", 1]', "bad_request", "expected a list of strings"),
        (b"[null]", "bad_request", "expected a list of strings"),
        (b'["a", ""]', "bad_request", "1 to 8 bytes"),
        (b'["a", "123456789"]', "bad_request", "1 to 8 bytes"),
        (b'["a", "\\u00e9\\u00e9\\u00e9\\u00e9\\u00e9"]', "bad_request", "1 to 8 bytes"),  # 10 B
        (b'["a", "b", "c", "d"]', "too_many_candidates", "at most 3"),
        (b'["a", "b", "\\u00e9", "d"]', "too_many_candidates", "at most 3"),
        (b'["a\xff"]', "bad_request", "malformed"),
    ],
)
def test_bad_candidates_name_the_rule(raw: bytes, code: str, words: str) -> None:
    with pytest.raises(CandidateError) as caught:
        parse(raw, max_count=3, max_id_bytes=8)
    assert code == caught.value.code
    assert words in str(caught.value)
    assert str(caught.value).startswith("candidates: ")


def test_empty_list_is_fine() -> None:
    assert 0 == len(parse(b"[ ]"))
    assert [] == parse(b"[]").pick(np.zeros(0, np.int64))


def test_pick_in_the_order_given() -> None:
    for cands in (parse(b'["a","b","c"]'), Candidates.from_ids(["a", "b", "c"])):
        assert ["c", "a"] == cands.pick(np.array([2, 0]))


# -------------------------------------------------------------- catalogue


@given(st.lists(_any_id, min_size=1, max_size=300, unique=True), st.data())
@settings(max_examples=60, deadline=None)
def test_catalog_agrees_with_a_dict(ids: list[str], data: st.DataObject) -> None:
    """Rows and model indices as a dict would give them; unknown ids are (-1, 0)."""
    split = data.draw(st.integers(0, len(ids)))
    vocabulary, state_items = ids[:split], ids[split // 2 :]  # overlapping on purpose
    catalog = Catalog(vocabulary)
    catalog.sync(state_items)
    model = {item: i + 1 for i, item in enumerate(vocabulary)}
    row = {item: r for r, item in enumerate(state_items)}
    queries = [*data.draw(st.permutations(ids)), "never-seen", "x" * 40]
    rows, models = catalog.lookup(Candidates.from_ids(queries))
    assert [row.get(q, -1) for q in queries] == rows.tolist()
    assert [model.get(q, 0) for q in queries] == models.tolist()
    assert [model.get(i, 0) for i in state_items] == catalog.model_of_row.tolist()


def test_catalog_grows_and_syncs_in_steps() -> None:
    """Many ids in steps (the table and arena grow many times); earlier rows stay right."""
    items = [f"item-{n}-{'x' * (n % 50)}" for n in range(40_000)]
    catalog = Catalog(items[::3])
    for end in (1, 10, 1000, 25_000, 40_000):
        catalog.sync(items[:end])
    assert catalog.state_rows == 40_000
    probe = [items[n] for n in range(0, 40_000, 7)]
    rows, models = catalog.lookup(Candidates.from_ids(probe))
    assert list(range(0, 40_000, 7)) == rows.tolist()
    assert [n // 3 + 1 if n % 3 == 0 else 0 for n in range(0, 40_000, 7)] == models.tolist()
    assert len(items) == len(catalog)


def test_catalog_keys_are_bytes_exact() -> None:
    """Prefixes, case and one changed byte are different keys."""
    catalog = Catalog(["abc", "ABC", "ab", "abd"])
    _, models = catalog.lookup(Candidates.from_ids(["abc", "ab", "abcd", "ABC", "abd", "a"]))
    assert [1, 3, 0, 2, 4, 0] == models.tolist()


# ------------------------------------------------------ features and scores


def reference_features(state: State, user_row: int, rows: np.ndarray, now: float) -> np.ndarray:
    """daemon.ranking's feature definitions, written out with numpy, row by row."""
    out = np.zeros((len(rows), 3))
    half_life = state.config.half_life_s
    pop, pop_ts, created, category = (state.array(n) for n in
                                      ("pop", "pop_ts", "created_at", "category"))  # fmt: skip
    cat_idx, cat_w, cat_ts = (state.array(n) for n in ("cat_idx", "cat_w", "cat_ts"))
    for t, r in enumerate(rows):
        if r < 0:
            continue
        decayed = pop[r] * 2 ** (-max(now - pop_ts[r], 0) / half_life)
        out[t, 0] = math.log1p(max(decayed, 0))
        if user_row >= 0 and cat_ts[user_row]:
            decay = 2 ** (-max(now - cat_ts[user_row], 0) / half_life)
            slots = range(user_row * state.K, (user_row + 1) * state.K)
            out[t, 1] = sum(cat_w[s] * decay for s in slots
                            if cat_idx[s] >= 0 and cat_idx[s] == category[r])  # fmt: skip
        if created[r]:
            out[t, 2] = 2 ** (-max(now - created[r], 0) / half_life)
    return out


def folded_state(rng: np.random.Generator) -> State:
    state = State()
    events = [ItemUpdated(id=f"it{n}", ts=T - 5e5, item=f"i{n}",
                          fields={"category": f"c{n % 4}", "created_at": T - n * 3e4}
                          if n % 5 else {"title": "no category, no date"})
              for n in range(60)]  # fmt: skip
    kinds = (Viewed, Clicked, Purchased)
    for n in range(400):
        kind = kinds[int(rng.integers(3))]
        user, item = f"u{int(rng.integers(12))}", f"i{int(rng.integers(70))}"
        events.append(kind(id=f"e{n}", ts=T - float(rng.uniform(0, 3e6)), user=user, item=item))
    events.sort(key=lambda e: e.ts)
    project(state, events)
    return state


def test_features_match_the_definitions() -> None:
    """Popularity, category interest and freshness of known, unknown and dateless items."""
    state = folded_state(np.random.default_rng(1))
    rows = np.array([*range(state.n_items), -1, -1], np.int32)
    users = [*range(state.n_users), -1]
    now = T + 1e4
    offsets = np.arange(len(users) + 1, dtype=np.int64) * len(rows)
    out = np.empty((len(rows) * len(users), 3), np.float32)
    columns = (state.array(n) for n in ("pop", "pop_ts", "created_at", "category",
                                        "cat_idx", "cat_w", "cat_ts"))  # fmt: skip
    features_batch(np.tile(rows, len(users)), offsets, np.array(users, np.int64), *columns,
                   state.K, now, state.config.half_life_s, out)  # fmt: skip
    for b, u in enumerate(users):
        expected = reference_features(state, u, rows, now)
        np.testing.assert_allclose(
            out[b * len(rows) : (b + 1) * len(rows)], expected, rtol=2e-6, atol=1e-7
        )
    assert (out[:, 1] > 0).any()  # the interest branch was exercised
    assert (out[:, 2] == 0).any()
    assert (out[:, 2] > 0).any()


@given(st.data())
@settings(max_examples=80, deadline=None)
def test_fused_scores_and_top_k_match_a_stable_sort(data: st.DataObject) -> None:
    """Scores = weights · features (+ dot product where there is a vector); top k = stable sort."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    sizes = data.draw(st.lists(st.integers(0, 60), min_size=1, max_size=6))
    ks = np.array([data.draw(st.integers(1, 80)) for _ in sizes], np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    total, dim = int(offsets[-1]), 8
    table = rng.normal(size=(30, dim)).astype(np.float32)
    vectors = rng.normal(size=(len(sizes), dim)).astype(np.float32)
    has_vector = rng.random(len(sizes)) < 0.7
    models = rng.integers(0, 30, total).astype(np.int32)
    # coarse values so that ties happen and stability is tested
    features = rng.integers(0, 3, (total, 3)).astype(np.float32)
    weights = np.array([0.5, 1.0, 0.25], np.float32)
    if data.draw(st.booleans()):
        table[:] = 0.0  # many equal scores
    scores = np.empty(total, np.float32)
    order = np.empty(total, np.int64)
    counts = np.empty(len(sizes), np.int64)
    code = rank_batch_fused(table, vectors, has_vector, models, offsets, ks, features, weights,
                            scores, order, counts)  # fmt: skip
    assert 0 == code
    for b in range(len(sizes)):
        t0, t1 = offsets[b], offsets[b + 1]
        dots = table[models[t0:t1]] @ vectors[b] if has_vector[b] else np.zeros(t1 - t0)
        dots[models[t0:t1] == 0] = 0.0
        expected = features[t0:t1] @ weights + dots
        np.testing.assert_allclose(scores[t0:t1], expected, rtol=1e-5, atol=1e-5)
        k = min(int(ks[b]), int(t1 - t0))
        assert k == counts[b]
        best = np.argsort(-scores[t0:t1], kind="stable")[:k]
        assert best.tolist() == order[t0 : t0 + k].tolist()


def test_model_index_outside_the_table_is_refused() -> None:
    one, out = np.ones(1, np.int64), np.empty(1, np.int64)
    code = rank_batch_fused(np.zeros((3, 2), np.float32), np.ones((1, 2), np.float32),
                            np.ones(1, bool), np.array([3], np.int32), np.array([0, 1]), one,
                            np.zeros((1, 3), np.float32), np.ones(3, np.float32),
                            np.empty(1, np.float32), out, out.copy())  # fmt: skip
    assert 1 == code
