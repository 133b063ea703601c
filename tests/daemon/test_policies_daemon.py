"""The ranking policies on a real daemon's answers: [plugins].policies, in order."""

from __future__ import annotations

import time
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
