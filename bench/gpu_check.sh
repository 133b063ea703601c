#!/usr/bin/env bash
# One-shot GPU check of the kernels: the record of how the GPU figures were made.
#
# Runs once on a rented single-GPU machine with no network (Python 3.12 `python3` with
# jax + CUDA plugin, numpy, numba, optax, safetensors, hypothesis, pytest, CUDA torch).
# Packages missing there travel as wheels in .whl/ (carried by the device tool):
# msgspec, structlog, sqlite-utils, sqlite-fts4, click-default-group, pytest-asyncio.
#
#   OUT=/some/dir bash bench/gpu_check.sh                     # on the GPU machine
#   GPU_CHECK_DRY=1 OUT=/tmp/gpucheck bash bench/gpu_check.sh  # plumbing only, on a CPU
#
# Steps (each under its own `timeout`, all under one deadline, GPU_CHECK_BUDGET_S, 400 s
# by default, so the whole run ends within 7 minutes):
#   1. wheels into /tmp/site; nvidia-smi, versions, jax.devices()           -> setup.log
#   2. precision probe: rerankd's user vectors (B = 64) against the float64 reference of
#      the tests, at JAX's default matmul precision (TF32 on an H100) and at "highest";
#      the bench runs at the default unless it misses bench_kernels' 1e-4 bound   -> setup.log
#   3. bench/bench_kernels.py --device gpu (full run; --quick when time is short), torch
#      baseline run by this machine's python3; if it stops on a correctness check at the
#      default precision, once more at "highest"   -> bench_kernels.log, kernels_<prec>.json
#   4. pytest tests/kernels on the GPU (xdist when there, every failure listed, not -x);
#      if any fail, the failed ones again with JAX_DEFAULT_MATMUL_PRECISION=highest
#                                                                        -> kernels_tests.log
# The bench goes before the tests so that its timings see a quiet machine.
# summary.txt: each step's exit status and seconds. Dry run (GPU_CHECK_DRY=1): no wheel
# install, --device cpu --quick, the torch baseline from bench/.venv if present.
# Overrides: BENCH_PRECISION=default|highest (skip the probe's choice), TORCH_PY (the
# baseline's Python), GPU_CHECK_TESTS (test paths, default tests/kernels and the daemon's ranking tests).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
: "${OUT:?OUT must name the output folder}"
mkdir -p "$OUT"
DRY=${GPU_CHECK_DRY:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-400}
START=$SECONDS
SUMMARY=$OUT/summary.txt
SETUP_LOG=$OUT/setup.log
TESTS_LOG=$OUT/kernels_tests.log
BENCH_LOG=$OUT/bench_kernels.log
: >"$SUMMARY"

export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false # torch worker / xdist workers share the GPU

left() { echo $((BUDGET - (SECONDS - START))); }
say() { echo "[gpu_check +$((SECONDS - START))s] $*" | tee -a "$SUMMARY"; }

# run_step NAME CAP LOG CMD...: CMD under `timeout min(CAP, time left)`, output appended
# to LOG; sets RC (124: timed out, 999: skipped for lack of time).
run_step() {
  local name=$1 cap=$2 log=$3 t t0
  shift 3
  t=$(left)
  ((t > cap)) && t=$cap
  if ((t < 15)); then
    RC=999
    say "$name: skipped, $(left) s left"
    return
  fi
  t0=$SECONDS
  echo "=== $name (timeout ${t}s): $*" >>"$log"
  timeout -k 10 "$t" "$@" >>"$log" 2>&1
  RC=$?
  say "$name: rc $RC in $((SECONDS - t0)) s (limit ${t} s)"
}

# --- 1. set-up ---------------------------------------------------------------------------
if [[ $DRY == 1 ]]; then
  say "DRY RUN: no wheel install, --device cpu --quick"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  DEVICE=cpu
  TORCH_PY=${TORCH_PY:-$PWD/bench/.venv/bin/python}
  [[ -x $TORCH_PY ]] || TORCH_PY=$(command -v python3)
else
  run_step "install wheels" 60 "$SETUP_LOG" python3 -m pip install -q --no-index --no-deps \
    --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  ((RC == 0)) || { say "wheel install failed: see setup.log"; cat "$SETUP_LOG"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  DEVICE=gpu
  TORCH_PY=${TORCH_PY:-$(command -v python3)}
fi
{
  echo "=== machine"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  else
    echo "nvidia-smi: not available"
  fi
  echo "nproc $(nproc); python3 $(command -v python3); torch python $TORCH_PY"
  echo "PYTHONPATH=$PYTHONPATH"
  python3 -m pip list 2>/dev/null | grep -iE '^(jax\S*|numpy|numba|optax|safetensors|torch|pytest\S*|hypothesis|msgspec|structlog|sqlite\S*|click\S*|pluggy|tabulate|python-dateutil)\s' || true
} >>"$SETUP_LOG" 2>&1

# --- 2. versions, devices, precision probe ---------------------------------------------
PROBE=$(mktemp)
run_step "jax devices + precision probe" 90 "$SETUP_LOG" python3 - "$DEVICE" "$PROBE" <<'PY'
import platform
import sys
import time

import jax
import jaxlib
import numpy as np

print("python", platform.python_version(), "jax", jax.__version__, "jaxlib", jaxlib.__version__)
print("jax.devices():", jax.devices(), "default backend:", jax.default_backend())
sys.path[:0] = ["bench", "tests/kernels"]
import bench_kernels as bk  # noqa: E402
import sasrec_numpy as ref  # noqa: E402
from kernels.runtime import Ranker  # noqa: E402

device = bk.pick_device(sys.argv[1])
params = bk.make_params()
seqs, idx, feats = bk.make_inputs(np.random.default_rng(1), 64, 500)
cfg = bk.CONFIG
want = ref.encode_users(params, seqs, num_blocks=cfg.num_blocks, num_heads=cfg.num_heads)
table = params["item_emb"].astype(np.float64)
want_scores = np.einsum("bd,bnd->bn", want, table[idx]) + feats @ np.asarray(bk.WEIGHTS)
errs, warm = {}, {}
for prec in ("default", "highest"):
    t0 = time.perf_counter()
    with jax.default_matmul_precision(None if prec == "default" else prec):
        r = Ranker(params, cfg, top_k=bk.TOP_K, feature_weights=bk.WEIGHTS, device=device,
                   batch_buckets=(64,), candidate_buckets=(512,))
        warm[prec] = r.warmup().seconds
    vecs = r.encode(seqs)
    s = r.score(vecs, idx, features=feats)
    errs[prec] = bk.rel_error(vecs.astype(np.float64), want)
    top_ok = sum(set(a) == set(b) for a, b in
                 zip(s.top_idx.tolist(), np.argsort(-want_scores, 1)[:, :bk.TOP_K].tolist(),
                     strict=True))
    print(f"{prec:8s} on {device}: user vectors rel. error {errs[prec]:.2e} "
          f"(bench bound {bk.VEC_RTOL:.0e}), scores rel. error "
          f"{bk.rel_error(s.scores.astype(np.float64), want_scores):.2e}, "
          f"top-{bk.TOP_K} set = float64's in {top_ok}/64 rows; "
          f"{time.perf_counter() - t0:.1f} s, of which {warm[prec]:.1f} s compiling 2 kernels")
choice = "default" if errs["default"] <= bk.VEC_RTOL else "highest"
# the bench compiles 72 kernels (9 encoders, 63 scorers); ~40 s of start-up and checks;
# its timed part took ~110 s (full) and ~15 s (--quick) by the estimate from a CPU run
per_kernel = min(warm.values()) / 2
est_full, est_quick = (round(40 + 72 * per_kernel + t) for t in (110, 15))
print(f"bench precision: {choice}; estimated bench seconds: full {est_full}, quick {est_quick}")
open(sys.argv[2], "w").write(f"{choice} {est_full}\n")
PY
read -r PREC EST_FULL <"$PROBE" || true
PREC=${BENCH_PRECISION:-${PREC:-default}}
EST_FULL=${EST_FULL:-250}
rm -f "$PROBE"
cat "$SETUP_LOG"
if [[ $DRY != 1 ]] && ! grep -q "default backend: gpu" "$SETUP_LOG"; then
  say "jax sees no GPU (setup.log): stopping here rather than testing on the CPU"
  exit 2
fi

# --- 3. kernel benchmark -----------------------------------------------------------------
STAMP=$(mktemp)
# bench_kernels writes bench/out/kernels.json; keep it as $OUT/kernels_<precision>.json
bench() { # bench PRECISION
  local prec=$1 size=() env=()
  # full when its estimate fits the bench's 260 s and leaves the tests 100 s
  if [[ $DRY == 1 ]] || ((EST_FULL > 260 || EST_FULL > $(left) - 100)); then size=(--quick); fi
  [[ $prec == default ]] || env=(env "JAX_DEFAULT_MATMUL_PRECISION=$prec")
  run_step "bench_kernels ${size[*]:-full} at $prec precision" 260 "$BENCH_LOG" \
    "${env[@]}" python3 bench/bench_kernels.py --device "$DEVICE" "${size[@]}" \
    --torch-python "$TORCH_PY" --retries 0
  if [[ bench/out/kernels.json -nt $STAMP ]]; then
    mv bench/out/kernels.json "$OUT/kernels_$prec.json"
  fi
}
bench "$PREC"
if ((RC != 0)) && [[ $PREC == default ]] && grep -q "differ" "$BENCH_LOG" && (($(left) >= 100)); then
  say "bench stopped on a correctness check at the default precision: again at highest"
  bench highest
fi
rm -f "$STAMP"
if grep -q '^Machine:' "$BENCH_LOG"; then sed -n '/^Machine:/,$p' "$BENCH_LOG"; else tail -n 25 "$BENCH_LOG"; fi

# --- 4. kernel tests on the device -------------------------------------------------------
read -ra TESTS <<<"${GPU_CHECK_TESTS:-tests/kernels tests/daemon/test_ranking.py}"
# -v: each test's outcome is in the log as it happens, also if the timeout stops the run
PYTEST=(python3 -m pytest "${TESTS[@]}" -v -o cache_dir=/tmp/gpu_check_pytest_cache)
if ! python3 -c "import pytest_asyncio.plugin" >>"$TESTS_LOG" 2>&1; then
  # pyproject's --strict-config would reject asyncio_* keys: a minimal ini instead, and
  # the plugin's entry point left unloaded (tests/kernels has no async tests)
  printf '[pytest]\naddopts = -ra\nmarkers =\n    slow: long\n' >/tmp/gpu_check_pytest.ini
  PYTEST+=(-c /tmp/gpu_check_pytest.ini --rootdir "$PWD" -p no:asyncio)
  say "pytest-asyncio does not load: tests run with a minimal ini"
fi
if [[ $DRY != 1 ]] && python3 -c "import xdist" 2>/dev/null; then PYTEST+=(-n 8); fi
run_step "pytest ${TESTS[*]}" 200 "$TESTS_LOG" "${PYTEST[@]}"
if ((RC == 1)); then
  run_step "pytest --lf at highest precision" 60 "$TESTS_LOG" \
    env JAX_DEFAULT_MATMUL_PRECISION=highest "${PYTEST[@]}" --lf
fi
grep -E "FAILED|ERROR|[0-9]+ (passed|failed|errors?)( |,|$)|^=== " "$TESTS_LOG" |
  cut -c1-220 | tail -n 40

echo "--- bench targets"
grep -A1 -E "^ +(MET|MISSED)" "$BENCH_LOG" || echo "(none: see bench_kernels.log)"
say "done; $(left) s of the ${BUDGET} s budget left; files: $(ls "$OUT" | tr '\n' ' ')"
