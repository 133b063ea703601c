"""`rerankd train`, `eval` and `replay` on tiny data sets with a known pattern."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.quality import TrainOptions, load_dataset, plan, remap
from daemon.replay import split_for_replay
from eventstore.schema import Viewed
from kernels.modelfile import load_model

N_ITEMS = 30


def _cycle_file(path: Path, *, users: int = 80, length: int = 12, seed: int = 0) -> Path:
    """Each user walks the cycle 1 -> 2 -> ... -> 30 -> 1 from a random start."""
    rng = np.random.default_rng(seed)
    lines = []
    for u in range(1, users + 1):
        start = int(rng.integers(N_ITEMS))
        lines += [f"{u} {(start + j) % N_ITEMS + 1}" for j in range(length)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _rerankd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "daemon.cli", *args], capture_output=True,
                          text=True, timeout=600, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("quality")
    data = _cycle_file(tmp / "cycle.txt")
    model = tmp / "cycle.safetensors"
    done = _rerankd("train", "--dataset", str(data), "--format", "sasrec", "--out", str(model),
                    "--dim", "16", "--epochs", "30", "--dropout", "0.1", "--seed", "3",
                    "--holdout", "0.25",
                    "--quiet", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return {"data": data, "model": model, "report": json.loads(done.stdout), "tmp": tmp}


def test_train_writes_the_model_and_its_report(trained: dict[str, Any]) -> None:
    model: Path = trained["model"]
    loaded = load_model(model)
    assert loaded.manifest.config.num_items == N_ITEMS
    assert loaded.manifest.extra is not None
    assert loaded.manifest.extra["trained_by"] == "rerankd train"
    report = json.loads(model.with_name(model.name + ".train.json").read_text())
    assert report["users"] == 80
    assert report["interactions"] == 80 * 9  # the last 3 of 12 were left out (--holdout)
    # an ensemble of 3 by default, all kept (no time budget pressure on this data)
    assert (3, 3) == (loaded.manifest.config.members, report["members"])
    assert len(report["history"]) == report["epochs"] >= 1
    assert {"train_loss", "val_ndcg_at_10", "val_hr_at_10"} <= set(report["history"][0])
    png = model.with_name(model.name + ".train.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    # the pattern is learnable: validation NDCG@10 far above a random order's (~0.1)
    assert trained["report"]["val_ndcg@10"] > 0.5


def test_train_is_deterministic_with_seed(trained: dict[str, Any]) -> None:
    from daemon.quality import train  # noqa: PLC0415

    again = trained["tmp"] / "again.safetensors"
    data = load_dataset(trained["data"], "sasrec")
    train(data, again, TrainOptions(seed=3, dim=16, max_epochs=30, dropout=0.1, progress=False,
                                    holdout=0.25))
    first, second = load_model(trained["model"]).params, load_model(again).params
    for name, value in first.items():
        np.testing.assert_array_equal(value, second[name], err_msg=name)


def test_eval_json_has_every_figure_and_sees_the_pattern(trained: dict[str, Any]) -> None:
    done = _rerankd("eval", "--model", str(trained["model"]), "--dataset", str(trained["data"]),
                    "--format", "sasrec", "--protocol", "sampled-100", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    keys = {"hr@10", "ndcg@10", "mrr", "coverage@10", "ild@10", "novelty@10", "users",
            "protocol", "seconds"}  # fmt: skip
    assert keys <= set(figures)
    assert figures["protocol"] == "sampled-100"
    assert figures["users"] == 80
    # 30 items: the 100 negatives are the user's ~18 unseen items drawn ~5 times each, so
    # HR@10 needs the test item above nearly all of them: about 2/19 for a random order
    assert figures["hr@10"] > 0.5
    assert 0 < figures["coverage@10"] <= 1


def test_eval_full_writes_a_markdown_report(trained: dict[str, Any]) -> None:
    report = trained["tmp"] / "full.md"
    done = _rerankd("eval", "--model", str(trained["model"]), "--dataset", str(trained["data"]),
                    "--format", "sasrec", "--protocol", "full",
                    "--report", str(report))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ndcg@10" in done.stdout
    text = report.read_text()
    assert "Protocol `full`" in text
    assert "| hr@10 |" in text
    assert (trained["tmp"] / "full.hr.png").read_bytes().startswith(b"\x89PNG")


def test_commands_name_the_missing_or_bad_option(tmp_path: Path, trained: dict[str, Any]) -> None:
    done = _rerankd("train", "--out", str(tmp_path / "m.safetensors"))
    assert done.returncode != 0
    assert "either --dataset FILE --format FMT or --log" in done.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\nnot a line\n")
    done = _rerankd("eval", "--model", str(trained["model"]), "--dataset", str(bad),
                    "--format", "sasrec")  # fmt: skip
    assert done.returncode == 1
    assert "bad.txt:2: expected 'user item'" in done.stderr
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    done = _rerankd("eval", "--model", str(broken), "--dataset", str(trained["data"]),
                    "--format", "sasrec")  # fmt: skip
    assert done.returncode == 1
    assert "broken.safetensors" in done.stderr


def test_replay_live_beats_frozen_on_the_cycle(trained: dict[str, Any]) -> None:
    """Frozen state predicts only the first held-out step of the cycle; live predicts each."""
    done = _rerankd("replay", "--dataset", str(trained["data"]), "--format", "sasrec",
                    "--model", str(trained["model"]), "--holdout", "0.25", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["held_out"] == 80 * 3  # floor(0.25 * 12) per user
    assert report["skipped"] == 0
    assert report["model_holdout"] == 0.25  # the model never saw the held-out part
    assert report["live"]["ndcg@10"] > report["frozen"]["ndcg@10"]
    assert report["lift"]["ndcg@10"] > 0.1
    # a user's first held-out step is ranked alike in both modes; the other two differ,
    # so the lift over those alone is larger
    after = report["after_first"]
    assert after["held_out"] == 80 * 2
    assert after["lift"]["ndcg@10"] > report["lift"]["ndcg@10"]


# ----------------------------------------------------------------------------- pure parts


def _views(user: str, items: list[str]) -> list[Viewed]:
    return [Viewed(id=f"{user}-{n}", ts=1.7e9 + n, user=user, item=i) for n, i in enumerate(items)]


def test_replay_split_holds_out_the_last_fifth_and_at_least_one() -> None:
    events = [*_views("a", list("abcdefghij")), *_views("b", ["x"]), *_views("c", list("pqrst"))]
    split = split_for_replay(events, 0.2)
    held = [(h.event.user, h.event.item, h.round) for h in split.held_out]
    assert held == [("a", "i", 0), ("a", "j", 1), ("b", "x", 0), ("c", "t", 0)]
    assert [e.item for e in split.history if e.user == "a"] == list("abcdefgh")
    assert not [e for e in split.history if e.user == "b"]
    assert split.users == 3
    with pytest.raises(ValueError, match="holdout: must be between 0 and 1"):
        split_for_replay(events, 1.0)


def test_live_ranks_each_interaction_on_the_state_folded_up_to_it() -> None:
    """Bookkeeping: the state seen at each ranking holds history + earlier held-out events."""
    from daemon.protocol import Rank  # noqa: PLC0415
    from daemon.replay import _live  # noqa: PLC0415
    from eventstore import State, project  # noqa: PLC0415

    events = [*_views("a", list("abcdefghij")), *_views("b", list("klmnopqrst"))]
    split = split_for_replay(events, 0.3)
    state = project(State(), split.history)
    seen_counts: list[tuple[str, int]] = []
    refreshed: list[list[str | None]] = []

    class Recorder:
        def rank_batch(self, requests: list[Rank]) -> list[Any]:
            out = []
            for r in requests:
                seen_counts.append((r.user, int(state.n_events[state.user_index[r.user]])))
                out.append(type("A", (), {"items": r.candidates.ids()})())
            return out

        def refresh(self, rows: list[int]) -> int:
            refreshed.append(sorted(state.user_ids[u] for u in rows))
            return len(rows)

    requests = [Rank(user=h.event.user, candidates=[h.event.item, "z"]) for h in split.held_out]
    targets = [h.event.item for h in split.held_out]
    ranks = _live(state, lambda _: Recorder(), split.held_out, requests, targets)
    assert ranks.tolist() == [1] * 6
    assert sorted(seen_counts) == [("a", 7), ("a", 8), ("a", 9), ("b", 7), ("b", 8), ("b", 9)]
    assert int(state.n_events[state.user_index["a"]]) == 10  # everything folded at the end
    assert refreshed == [["a", "b"]] * 3  # the refresher runs after each fold, in time order


def test_plan_chooses_length_and_dropout_from_the_data(tmp_path: Path) -> None:
    short = load_dataset(_cycle_file(tmp_path / "s.txt", length=8), "sasrec")
    chosen = plan(short, TrainOptions())
    assert chosen.config.max_len == 50
    assert chosen.config.dropout == 0.5
    long = load_dataset(_cycle_file(tmp_path / "l.txt", length=180, users=20), "sasrec")
    chosen = plan(long, TrainOptions())
    assert chosen.config.max_len == 200
    assert chosen.config.dropout == 0.2
    assert chosen.loss == "full"  # 30 items: the full softmax is cheap


def test_ensemble_size_follows_the_estimated_epoch_and_the_budget() -> None:
    """
    256 full rows at L = 200 in batches of 128: 2 steps, 51,200 slots and 10.24M pairs,
    an estimated 3.79 s a member's epoch, 151.6 s for 40 epochs: 3 members fit 8
    minutes, 2 fit 5.5, one is all 2 minutes give (and all that was asked, once).
    """
    from daemon.quality import (  # noqa: PLC0415
        ENSEMBLE_MIN_EPOCHS,
        SECONDS_PER_PAIR,
        SECONDS_PER_SLOT,
        affordable_members,
    )

    rows = np.ones((256, 200), np.int32)
    epoch_s = 51_200 * SECONDS_PER_SLOT + 10_240_000 * SECONDS_PER_PAIR
    assert 120 < 40 * epoch_s < 2 * 40 * epoch_s < 330 < 3 * 40 * epoch_s < 480  # as above
    assert ENSEMBLE_MIN_EPOCHS == 40
    found = [affordable_members(rows, TrainOptions(max_minutes=m, members=k))
             for m, k in ((8.0, 3), (5.5, 3), (2.0, 3), (8.0, 1), (8.0, 2))]  # fmt: skip
    assert [3, 2, 1, 1, 2] == [members for members, _ in found]
    assert {round(epoch_s, 6)} == {round(e, 6) for _, e in found}


def test_remap_drops_items_the_model_does_not_know(tmp_path: Path) -> None:
    data = load_dataset(_cycle_file(tmp_path / "c.txt", users=3, length=4), "sasrec")
    known = data.vocabulary[:-3]
    sequences, dropped = remap(data, known)
    assert dropped == sum(int(np.sum(s > len(known))) for s in data.sequences)
    assert all(s.max(initial=0) <= len(known) for s in sequences)


def test_train_from_the_daemons_own_log(tmp_path: Path) -> None:
    """`train --log` reads the store's SQLite log (imported here with `rerankd import`)."""
    data = _cycle_file(tmp_path / "cycle.txt", users=40, length=8)
    config = tmp_path / "rerankd.toml"
    config.write_text(f'[store]\ndata_dir = "{tmp_path / "var"}"\n')
    done = _rerankd("import", str(data), "--format", "sasrec", "--config", str(config))
    assert done.returncode == 0, done.stderr
    model = tmp_path / "log.safetensors"
    done = _rerankd("train", "--log", "--config", str(config), "--out", str(model), "--dim", "8",
                    "--epochs", "2", "--quiet", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["dataset"] == "log"
    assert report["users"] == 40
    assert report["interactions"] == 40 * 8
    assert set(load_model(model).manifest.vocabulary) == {str(i) for i in range(1, N_ITEMS + 1)}
    done = _rerankd("train", "--log", "--config", str(tmp_path / "none.toml"), "--out",
                    str(model))  # fmt: skip
    assert done.returncode == 1
