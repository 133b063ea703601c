"""The ranking policies on a real daemon's answers: [plugins].policies, in order."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

from test_service import fixture_model_file  # noqa: F401 - the trained tiny model

NOW = time.time()


def _event(n: int, kind: str, user: str, item: str) -> dict[str, Any]:
    return {"id": f"e-{n}", "type": kind, "user": user, "item": item, "ts": NOW - 60 + n * 0.001}


RULES = """
[plugins]
policies = ["rules"]
[plugins.rules]
pins = { "i-9" = 0 }
max_per_category = 1
"""


def test_rules_filter_pin_and_cap_the_answer(start: Any) -> None:
    """
    A purchased item never comes back, a pinned one is first, one item per category
    in the top k, and k applies after the policies; explain names what each did.
    """
    daemon = start(RULES)
    with daemon.client() as client:
        items = [{"id": f"item-{n}", "type": "item", "item": f"i-{n}", "ts": NOW - 100,
                  "fields": {"category": "shoes" if n < 5 else f"c{n}"}}
                 for n in range(10)]  # fmt: skip
        popular = [_event(n, "click", f"fan-{n}", f"i-{n % 3}") for n in range(30)]
        client.request("ingest", events=[*items, *popular,
                                         _event(100, "purchase", "alice", "i-1")])  # fmt: skip
        candidates = [f"i-{n}" for n in range(10)]
        ranked = client.request("explain", user="alice", candidates=candidates, k=4)
    got = ranked["items"]
    assert 4 == len(got) == len(ranked["scores"]) == len(ranked["explain"])
    assert "i-1" not in got  # alice bought it
    assert "i-9" == got[0]  # pinned
    shoes = [i for i in got if int(i.split("-")[1]) < 5]
    assert 1 == len(shoes)  # the cap
    assert "i-0" in got  # the most clicked shoe (i-1 is filtered)
    first = ranked["explain"][0]
    assert (0, 0) == (first["position"], first["policies"]["rules"]["pinned"])


def test_mmr_runs_on_the_models_item_embeddings(start: Any, model_file: Path) -> None:
    """With the model's embeddings MMR reorders the head; lambda_ = 1 keeps the model's order."""
    base = (f'max_candidates = 32\n[ranking]\nmodel_path = "{model_file}"\nmax_batch = 4\n'
            "batch_buckets = [1, 4]\ncandidate_buckets = [8, 32]\n")  # fmt: skip
    history = [_event(n, "view", "bob", f"m{n}") for n in (3, 4, 5)]
    candidates = [f"m{n}" for n in range(1, 21)]
    answers = {}
    for lam in (1.0, 0.0):
        daemon = start(base + f'[plugins]\npolicies = ["mmr"]\n[plugins.mmr]\nlambda_ = {lam}\n')
        with daemon.client() as client:
            client.request("ingest", events=history)
            answer = client.request("explain", user="bob", candidates=candidates, k=5)
        daemon.stop()
        answers[lam] = answer
    keep, diverse = answers[1.0], answers[0.0]
    assert "m6" == keep["items"][0]  # the model's next item, MMR with lambda_ 1 keeps it
    assert all("mmr" in e["policies"] for e in keep["explain"])
    assert keep["items"] != diverse["items"]  # only diversity counts after the first pick
    assert keep["items"][0] == diverse["items"][0]


def _experiment_config(mode: str) -> str:
    return f"""
[plugins]
policies = ["experiment"]
[plugins.experiment]
name = "pin-c"
mode = "{mode}"
seed = 3
[[plugins.experiment.arms]]
name = "control"
[[plugins.experiment.arms]]
name = "pinned"
policies = ["rules"]
params = {{ rules = {{ pins = {{ "c" = 0 }} }} }}
"""


def _report(rerankd: Any, daemon: Any, done: Any) -> dict[str, Any]:
    """``rerankd experiments --json`` on the daemon's log, polled until ``done(report)``."""
    from daemons import poll  # noqa: PLC0415

    def read() -> dict[str, Any]:
        out = rerankd(daemon.tmp, "experiments", "--json", "--config", str(daemon.config))
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    return poll(read, done, timeout_s=30)


def test_ab_experiment_serves_each_user_their_arm_and_reports_the_clicks(
    start: Any, rerankd: Any
) -> None:
    """
    Raw user ids over the socket: each user always gets the same arm (also after a
    restart), the pinned arm's answers start with c, and `rerankd experiments` counts
    the impressions and the clicks sent back with each answer's ranking_id per arm.
    """
    daemon = start(_experiment_config("ab"))
    users = [f"user-{k}@example.com" for k in range(40)]
    arms: dict[str, str] = {}
    clicks = []
    with daemon.client() as client:
        for n, user in enumerate(users):
            answer = client.request("explain", user=user, candidates=["a", "b", "c"])
            arm = answer["explain"][0]["policies"]["experiment"]["arm"]
            arms[user] = arm
            assert (answer["items"][0] == "c") == (arm == "pinned")
            if n % 2 == 0:  # every other user clicks their first item
                clicks.append({"id": f"click-{n}", "type": "click", "user": user,
                               "item": answer["items"][0], "ts": NOW,
                               "ranking_id": answer["ranking_id"]})  # fmt: skip
        assert client.request("ingest", events=clicks)["accepted"] == len(clicks)
    count = Counter(arms.values())
    assert set(count) == {"control", "pinned"}

    def complete(report: dict[str, Any]) -> bool:
        return bool(report["experiments"]) and sum(
            a["impressions"] for a in report["experiments"][0]["arms"]) == len(users)

    (report,) = _report(rerankd, daemon, complete)["experiments"]
    assert (report["name"], report["mode"]) == ("pin-c", "ab")
    by_arm = {a["arm"]: a for a in report["arms"]}
    clicked = Counter(arms[c["user"]] for c in clicks)
    for arm in ("control", "pinned"):
        assert by_arm[arm]["impressions"] == count[arm]
        assert by_arm[arm]["clicks"] == by_arm[arm]["clicked"] == clicked[arm]
    assert "example.com" not in json.dumps(report)

    daemon.stop()
    again = start(_experiment_config("ab"))
    with again.client() as client:
        for user in users[:10]:
            answer = client.request("explain", user=user, candidates=["a", "b", "c"])
            assert answer["explain"][0]["policies"]["experiment"]["arm"] == arms[user]


def test_interleaving_credits_each_click_to_the_arm_that_placed_the_item(
    start: Any, rerankd: Any
) -> None:
    """
    Interleaved answers name each item's team; clicking the item the pinned arm placed
    makes it win that ranking, clicking control's item makes control win.
    """
    daemon = start(_experiment_config("interleave"))
    wins = Counter()
    with daemon.client() as client:
        events = []
        for n in range(12):
            answer = client.request("explain", user=f"u{n}", candidates=["a", "b", "c", "d"])
            teams = [e["policies"]["experiment"]["team"] for e in answer["explain"]]
            assert sorted(answer["items"]) == ["a", "b", "c", "d"]
            assert set(teams) == {"control", "pinned"}
            # the pinned arm's first pick is c: wherever c is, its team is pinned, or
            # control placed c because control's own first pick came first
            wanted = "pinned" if n % 3 else "control"
            position = teams.index(wanted)
            wins[wanted] += 1
            events.append({"id": f"c{n}", "type": "click", "user": f"u{n}",
                           "item": answer["items"][position], "ts": NOW,
                           "ranking_id": answer["ranking_id"]})  # fmt: skip
        client.request("ingest", events=events)

    def complete(report: dict[str, Any]) -> bool:
        return bool(report["experiments"]) and report["experiments"][0]["clicked"] == 12

    (report,) = _report(rerankd, daemon, complete)["experiments"]
    assert report["mode"] == "interleave"
    assert report["impressions"] == 12
    assert report["wins"] == {"control": wins["control"], "pinned": wins["pinned"]}
    assert report["ties"] == 0


def test_an_arm_with_its_own_model_ranks_by_it(start: Any, model_file: Path) -> None:
    """
    The daemon serves no model; the experiment's "model" arm re-scores with its own
    file: its users get exactly the answers a daemon serving that model gives (same
    log, same features), and control's users do not.
    """
    config = f"""
[ranking]
train_on_start = false
[plugins]
policies = ["experiment"]
[plugins.experiment]
name = "model-arm"
[[plugins.experiment.arms]]
name = "control"
[[plugins.experiment.arms]]
name = "model"
model = "{model_file}"
"""
    users = [f"viewer-{k}" for k in range(40)]
    history = [_event(100 * k + j, "view", user, f"m{(k + j) % 20 + 1}")
               for k, user in enumerate(users) for j in range(3)]  # fmt: skip
    candidates = [f"m{n}" for n in range(1, 21)]

    def answers(daemon: Any) -> dict[str, tuple[list[str], str | None]]:
        out = {}
        with daemon.client() as client:
            for user in users:
                answer = client.request("explain", user=user, candidates=candidates, k=5)
                policies = answer["explain"][0].get("policies", {})  # none configured: absent
                out[user] = (answer["items"], policies.get("experiment", {}).get("arm"))
        return out

    daemon = start(config)
    with daemon.client() as client:
        client.request("ingest", events=history)
    in_experiment = answers(daemon)
    daemon.stop()
    served = answers(start(f'[ranking]\nmodel_path = "{model_file}"\ntrain_on_start = false\n'))
    arms = Counter(arm for _, arm in in_experiment.values())
    assert set(arms) == {"control", "model"}
    for user, (items, arm) in in_experiment.items():
        if arm == "model":
            assert items == served[user][0]
    differ = [items != served[u][0]
              for u, (items, arm) in in_experiment.items() if arm == "control"]  # fmt: skip
    assert sum(differ) >= 0.8 * len(differ)
