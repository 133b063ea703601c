"""Leave-one-out splits, sampled negatives and both evaluation protocols on tiny data."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.evaluation import (
    ProtocolResult,
    evaluate,
    leave_one_out,
    sample_negatives,
)
from kernels.sasrec import SasrecConfig, encode_users, init_params

SEQUENCES = [
    np.array([1, 2, 3, 4, 5]),  # evaluated: train 1 2 3, validation 4, test 5
    np.array([6, 7]),  # two items: training only
    np.array([2, 8, 9]),  # evaluated: train 2, validation 8, test 9
    np.array([4]),  # one item: nothing to train on, not evaluated
]


def test_leave_one_out_splits_as_the_paper_does() -> None:
    split = leave_one_out(SEQUENCES, max_len=4)
    assert split.users.tolist() == [0, 2]
    assert split.val_targets.tolist() == [4, 8]
    assert split.test_targets.tolist() == [5, 9]
    assert split.val_inputs.tolist() == [[0, 1, 2, 3], [0, 0, 0, 2]]
    assert split.test_inputs.tolist() == [[1, 2, 3, 4], [0, 0, 2, 8]]
    # training rows: user 0's train part 1 2 3, user 1's whole 6 7; user 2's single item has no pair
    assert split.train_inputs.tolist() == [[0, 0, 1, 2], [0, 0, 0, 6]]
    assert split.train_targets.tolist() == [[0, 0, 2, 3], [0, 0, 0, 7]]
    assert sorted(split.seen_of(0).tolist()) == [1, 2, 3, 4, 5]
    assert sorted(split.seen_of(1).tolist()) == [2, 8, 9]


def test_leave_one_out_keeps_the_newest_max_len_items() -> None:
    split = leave_one_out([np.arange(1, 11)], max_len=3)
    assert split.test_inputs.tolist() == [[7, 8, 9]]
    assert split.val_inputs.tolist() == [[6, 7, 8]]
    assert split.train_inputs.tolist() == [[5, 6, 7]]
    assert split.train_targets.tolist() == [[6, 7, 8]]


def test_leave_one_out_refuses_padding_ids() -> None:
    with pytest.raises(ValueError, match=r"sequences\[0\]: item ids must be at least 1"):
        leave_one_out([np.array([0, 1, 2])], max_len=3)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sets(st.integers(1, 30), min_size=1, max_size=25), min_size=1, max_size=8),
    st.integers(0, 2**32 - 1),
)
def test_a_sampled_negative_is_never_an_item_the_user_interacted_with(
    seen: list[set[int]], seed: int
) -> None:
    indptr = np.zeros(len(seen) + 1, np.int64)
    np.cumsum([len(s) for s in seen], out=indptr[1:])
    flat = np.concatenate([np.fromiter(s, np.int32) for s in seen])
    negs = sample_negatives(np.random.default_rng(seed), indptr, flat, num_items=30, count=50)
    assert negs.shape == (len(seen), 50)
    for row, items in zip(negs, seen, strict=True):
        assert not set(row.tolist()) & items
        assert row.min() >= 1
        assert row.max() <= 30


def test_sampled_negatives_are_uniform_over_the_unseen_items() -> None:
    """Items 1..10, user saw 1..5: each of 6..10 is drawn about a fifth of the time."""
    indptr = np.array([0, 5])
    negs = sample_negatives(np.random.default_rng(0), indptr, np.arange(1, 6), num_items=10,
                            count=20_000)  # fmt: skip
    counts = np.bincount(negs[0], minlength=11)[6:]
    assert np.all(np.abs(counts / 20_000 - 0.2) < 0.015)


def test_sampling_for_a_user_who_saw_everything_is_refused() -> None:
    with pytest.raises(ValueError, match="interacted with every item"):
        sample_negatives(np.random.default_rng(0), np.array([0, 3]), np.array([1, 2, 3]),
                         num_items=3)  # fmt: skip


def test_summary_metrics_match_hand_computation() -> None:
    """Ranks 1, 3 and 12 of three users; top lists and item popularity given."""
    result = ProtocolResult(
        protocol="full",
        k=10,
        ranks=np.array([1, 3, 12]),
        top=np.array([[1, 2], [2, 3], [3, 1]]),
        ild=np.array([0.5, 0.25, 0.0], np.float32),
        num_items=8,
        item_users=np.array([0, 3, 1, 0, 0, 0, 0, 0, 0]),
    )
    s = result.summary()
    assert s["hr@10"] == pytest.approx(2 / 3)
    assert s["ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(4)) / 3)
    assert s["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 12) / 3)
    assert s["coverage@10"] == pytest.approx(3 / 8)  # items 1, 2, 3 of 8
    assert s["ild@10"] == pytest.approx(0.25)
    # p(1) = 3/3, p(2) = 1/3, p(3) = 1/3 (nobody: counted as one user)
    info = {1: 0.0, 2: math.log2(3), 3: math.log2(3)}
    expected = np.mean([info[i] for row in ([1, 2], [2, 3], [3, 1]) for i in row])
    assert s["novelty@10"] == pytest.approx(expected)
    assert s["users"] == 3


def _model(num_items: int) -> tuple[dict[str, jax.Array], SasrecConfig]:
    config = SasrecConfig(num_items=num_items, max_len=4, dim=8, num_blocks=1, dropout=0.0)
    return init_params(jax.random.key(3), config), config


def _pessimistic_rank(scores: np.ndarray, target: int, allowed: np.ndarray) -> int:
    return 1 + int(np.sum((scores >= scores[target]) & allowed)) - 1


def test_full_protocol_ranks_against_every_item_the_user_has_not_seen() -> None:
    """Ranks equal a direct numpy computation: seen items (but the target) excluded."""
    params, config = _model(12)
    split = leave_one_out(SEQUENCES, max_len=4)
    result = evaluate(params, config, split, protocol="full", batch_size=2)
    users = np.asarray(encode_users(params, split.test_inputs, config=config))
    scores = users @ np.asarray(params["item_emb"]).T
    for u in range(len(split.test_targets)):
        allowed = np.ones(13, bool)
        allowed[0] = False
        allowed[split.seen_of(u)] = False
        target = int(split.test_targets[u])
        allowed[target] = True
        assert result.ranks[u] == _pessimistic_rank(scores[u], target, allowed)
        # fewer than 10 rankable items here: the list is the allowed items by score, then 0s
        best = [i for i in np.argsort(-scores[u], kind="stable") if allowed[i]][:10]
        assert result.top[u].tolist() == best + [0] * (10 - len(best))


def test_sampled_protocol_ranks_the_target_among_101_candidates() -> None:
    params, config = _model(300)
    rng = np.random.default_rng(5)
    sequences = [rng.choice(np.arange(1, 301), size=8, replace=False) for _ in range(40)]
    split = leave_one_out(sequences, max_len=4)
    result = evaluate(params, config, split, protocol="sampled-100", seed=11, batch_size=16)
    # the same seed draws the same negatives: recompute the ranks directly
    negs = sample_negatives(np.random.default_rng(11), split.seen_indptr, split.seen_indices,
                            num_items=300)  # fmt: skip
    users = np.asarray(encode_users(params, split.test_inputs, config=config))
    table = np.asarray(params["item_emb"])
    for u in range(40):
        cands = np.concatenate([[split.test_targets[u]], negs[u]])
        scores = table[cands] @ users[u]
        assert result.ranks[u] == 1 + int(np.sum(scores[1:] >= scores[0]))
        assert set(result.top[u].tolist()) <= set(cands.tolist())
    assert result.ranks.max() <= 101
    again = evaluate(params, config, split, protocol="sampled-100", seed=11, batch_size=7)
    assert again.ranks.tolist() == result.ranks.tolist()


def test_max_users_evaluates_a_seeded_subset() -> None:
    params, config = _model(300)
    rng = np.random.default_rng(1)
    sequences = [rng.choice(np.arange(1, 301), size=6, replace=False) for _ in range(30)]
    split = leave_one_out(sequences, max_len=4)
    result = evaluate(params, config, split, protocol="full", max_users=10, seed=2)
    assert len(result.ranks) == 10
    assert result.summary()["users"] == 10


def test_unknown_protocol_is_refused() -> None:
    params, config = _model(12)
    split = leave_one_out(SEQUENCES, max_len=4)
    with pytest.raises(ValueError, match="protocol: must be one of sampled-100, full"):
        evaluate(params, config, split, protocol="sampled-50")  # type: ignore[arg-type]
