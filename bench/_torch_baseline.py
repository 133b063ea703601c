"""
The PyTorch-eager baseline of bench/bench_kernels.py, run as a worker process.

It runs under a different Python (bench/.venv, made by bench/setup-torch-env) and
imports only torch, numpy and the standard library. The model is written the obvious
way: functional ops under ``torch.inference_mode()``, ``F.layer_norm``, ``F.gelu(
approximate="tanh")``, ``torch.softmax``, every slot of the sequence computed, then
``F.embedding`` gather + ``bmm`` + ``torch.topk`` for the candidates.

    bench/.venv/bin/python bench/_torch_baseline.py --params P.npz --inputs I.npz \\
        [--device cpu|cuda] [--top-k 20]

Protocol: one JSON line per request on stdin, one JSON line per answer on stdout.
After start-up it prints ``{"ready": ...}`` with versions, threads and device; then

- ``{"op": "outputs", "cell": C, "mode": "full"|"score"}`` -> ``{"vecs", "scores",
  "top_scores", "top_idx"}`` of one call (lists);
- ``{"op": "time", "cell": C, "mode": M, "calls": n, "warmup": w}`` -> ``{"ns": [...]}``,
  the wall time of each of ``n`` complete calls (inputs from numpy, results back to
  numpy) after ``w`` untimed ones;
- ``{"op": "quit"}``.

Cell ``C`` names arrays ``C.seqs [B, L]``, ``C.idx [B, N]``, ``C.feats [B, N, F]`` and
``C.vecs [B, d]`` (cached user vectors) in the inputs file.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name

_LN_EPS = 1e-6
_MASKED_LOGIT = -1e9

Params = dict[str, torch.Tensor]


def _layer_norm(x: torch.Tensor, p: Params, name: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), p[name + ".scale"], p[name + ".bias"], _LN_EPS)


def _attention(
    x: torch.Tensor, p: Params, pre: str, allowed: torch.Tensor, heads: int
) -> torch.Tensor:
    b, t, d = x.shape
    c = d // heads

    def split(w: str, bias: str) -> torch.Tensor:
        return (x @ p[pre + w] + p[pre + bias]).view(b, t, heads, c).transpose(1, 2)

    q, k, v = split("wq", "bq"), split("wk", "bk"), split("wv", "bv")
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(c)
    logits = logits.masked_fill(~allowed[:, None], _MASKED_LOGIT)
    out = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
    return out @ p[pre + "wo"] + p[pre + "bo"]


def encode(p: Params, seqs: torch.Tensor, *, num_blocks: int, heads: int) -> torch.Tensor:
    """User vectors ``[B, d]``: every slot computed, the last one returned."""
    length, dim = p["pos_emb"].shape
    real = seqs > 0
    x = (F.embedding(seqs, p["item_emb"]) * math.sqrt(dim) + p["pos_emb"]) * real[..., None]
    causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).tril()
    allowed = causal[None] & real[:, None, :]
    for i in range(num_blocks):
        pre = f"block{i}."
        x = x + _attention(_layer_norm(x, p, pre + "ln_attn"), p, pre + "attn.", allowed, heads)
        h = _layer_norm(x, p, pre + "ln_ffn")
        h = F.gelu(h @ p[pre + "ffn.w1"] + p[pre + "ffn.b1"], approximate="tanh")
        x = (x + h @ p[pre + "ffn.w2"] + p[pre + "ffn.b2"]) * real[..., None]
    return _layer_norm(x[:, -1], p, "ln_final")


def score(
    p: Params, users: torch.Tensor, idx: torch.Tensor, feats: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores [B, N], top scores [B, k], top positions [B, k])``."""
    emb = F.embedding(idx, p["item_emb"])
    scores = torch.bmm(emb, users[:, :, None])[..., 0] + feats @ p["feature_weights"]
    top = torch.topk(scores, k, dim=1)
    return scores, top.values, top.indices


class Worker:
    """The model on one device and the benchmark cells' inputs as numpy arrays."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.device = torch.device(args.device)
        with np.load(args.params) as z:
            self.params = {n: torch.from_numpy(z[n]).to(self.device) for n in z.files}
        with np.load(args.inputs) as z:
            self.inputs = {n: z[n] for n in z.files}
        self.num_blocks = sum(1 for n in self.params if n.endswith("ln_attn.scale"))
        self.heads = args.num_heads
        self.k = args.top_k

    def _to(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(self.device)

    def _full(self, seqs: np.ndarray, idx: np.ndarray, feats: np.ndarray) -> tuple:
        with torch.inference_mode():
            users = encode(
                self.params, self._to(seqs), num_blocks=self.num_blocks, heads=self.heads
            )
            out = score(self.params, users, self._to(idx), self._to(feats), self.k)
            return (users.cpu().numpy(), *(t.cpu().numpy() for t in out))

    def _score(self, vecs: np.ndarray, idx: np.ndarray, feats: np.ndarray) -> tuple:
        with torch.inference_mode():
            out = score(self.params, self._to(vecs), self._to(idx), self._to(feats), self.k)
            return (vecs, *(t.cpu().numpy() for t in out))

    def call(self, cell: str, mode: str) -> Callable[[], tuple]:
        """A no-argument closure doing one complete call of ``mode`` on ``cell``."""
        get = self.inputs.__getitem__
        idx, feats = get(cell + ".idx"), get(cell + ".feats")
        if mode == "full":
            seqs = get(cell + ".seqs")
            return lambda: self._full(seqs, idx, feats)
        vecs = get(cell + ".vecs")
        return lambda: self._score(vecs, idx, feats)

    def outputs(self, req: dict) -> dict:
        names = ("vecs", "scores", "top_scores", "top_idx")
        return {
            n: a.tolist() for n, a in zip(names, self.call(req["cell"], req["mode"])(), strict=True)
        }

    def time(self, req: dict) -> dict:
        fn = self.call(req["cell"], req["mode"])
        for _ in range(req["warmup"]):
            fn()
        gc.collect()
        ns = np.empty(req["calls"], np.int64)
        clock = time.perf_counter_ns
        for i in range(len(ns)):
            t0 = clock()
            fn()
            ns[i] = clock() - t0
        return {"ns": ns.tolist()}


def _ready(worker: Worker) -> dict:
    dev = worker.device
    return {
        "ready": True,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(dev),
        "card": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "cuda_available": torch.cuda.is_available(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", required=True, help="npz of the model (+ feature_weights)")
    parser.add_argument("--inputs", required=True, help="npz of the cells' inputs")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--num-heads", type=int, default=1)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        args.device = "cpu"
    worker = Worker(args)
    ops = {"outputs": worker.outputs, "time": worker.time}
    print(json.dumps(_ready(worker)), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        print(json.dumps(ops[req["op"]](req)), flush=True)


if __name__ == "__main__":
    main()
