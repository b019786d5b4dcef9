#!/usr/bin/env bash
# The GPU check for a lent GPU machine (device tool), one command well inside 8 minutes on one H200:
#   bash bench/gpu_check.sh                  (from the repository root; wheels for what the machine lacks in .whl/)
#   bash bench/gpu_check.sh --device cpu     (the same script on the CPU with a small model: run it before a GPU sees it)
# Steps (cuda; the CPU mode skips 1 and hides any GPU):
#   0. versions of python, torch, transformers, ...
#   1. the executor's tests on that machine's own torch and transformers, GPU hidden: the evidence
#      needed to lower torch's floor in pyproject.toml (docs/dependencies.md);
#   2. bench/gpu_smoke.py: the executor in bfloat16 (one stage; two pipeline stages as two processes
#      on the same device) against transformers on the same device: greedy token-match rate over 16
#      prompts, judged by transformers in float32 and held to transformers' own bf16 rate minus 0.05
#      (see its docstring), and tokens/s against transformers' continuous batching (generate_batch);
#   3. hexplan profile on the same checkpoint and device, then the profile read back through
#      hexplan.load_cluster and checked against the cost model.
# Results: $OUT/gpu_check_results/ when OUT is set (the device tool brings $OUT back), else
# ./gpu_check_results/: summary.md, versions.txt, tests.log, smoke.{md,json,log}, profile.{yaml,log}.
# Exit status 0 when every step passed. Results go to docs/executor.md and docs/dependencies.md.
set -uo pipefail
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:-}"; shift 2 || shift ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --device cuda|cpu)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device: cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
PY="${PYTHON:-python3}"
RES="${OUT:+$OUT/}gpu_check_results"
mkdir -p "$RES" || exit 2
RES="$(cd "$RES" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 2
trap 'rm -rf "$WORK"' EXIT

if ls .whl/*.whl >/dev/null 2>&1 && [ "$DEVICE" = cuda ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" .whl/*.whl || exit 1
  export PYTHONPATH="$WORK/site"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "$DEVICE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=
  DTYPE=bfloat16
  SMOKE_ARGS=(--shape small)
  PROFILE_ARGS=(--decode-batches 1,4,16 --prefill-tokens 16,64,128 --layers 2 --threads 1)
  T_SMOKE=210; T_PROFILE=90
else
  DTYPE=bfloat16
  SMOKE_ARGS=(--shape bench)
  PROFILE_ARGS=()
  T_SMOKE=180; T_PROFILE=30
fi
START=$SECONDS
SUMMARY=()
step() {   # step NAME RC SECONDS
  local verdict=PASS; [ "$2" = 0 ] || verdict="FAIL (exit $2)"
  SUMMARY+=("| $1 | $verdict | $3 s |")
  echo "== $1: $verdict in $3 s"
}
rc=0

echo "== 0. versions ($DEVICE, results in $RES)"
"$PY" - <<'PY' | tee "$RES/versions.txt"
import importlib.metadata as m, sys
def v(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return "missing"
print("python", sys.version.split()[0], *(f"{p} {v(p)}" for p in
      ("torch", "transformers", "grpcio", "protobuf", "safetensors", "numpy", "highspy", "networkx", "pyyaml")))
import torch
print("cuda", torch.version.cuda, "available" if torch.cuda.is_available() else "not available",
      *(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))
PY
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check.sh: no CUDA device visible; use --device cpu to run the CPU mode" >&2
  exit 2
fi

if [ "$DEVICE" = cuda ]; then
  echo "== 1. executor tests, GPU hidden"
  t=$SECONDS
  # One torch thread per process (a test starts several on a 16-core machine); a per-test timeout
  # by thread, which dumps every thread's stack, where pytest-timeout is installed.
  TO=(); "$PY" -c 'import pytest_timeout' 2>/dev/null && TO=(--timeout 60 --timeout-method thread)
  CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS=1 timeout 240 "$PY" -m pytest -q -p no:cacheprovider "${TO[@]}" \
    --durations 10 tests/test_executor_model.py \
    tests/test_executor_e2e.py tests/test_prefill_only.py tests/test_interleave_model.py tests/test_mlfq_gateway.py \
    tests/test_profile.py tests/test_packaging.py -k "not wheel" > "$RES/tests.log" 2>&1
  r=$?; tail -15 "$RES/tests.log"; step "1. executor tests (GPU hidden)" $r $((SECONDS - t)); [ $r = 0 ] || rc=1
fi

echo "== 2. executor against transformers on $DEVICE ($DTYPE)"
t=$SECONDS
timeout $T_SMOKE "$PY" bench/gpu_smoke.py --device "$DEVICE" --dtype "$DTYPE" "${SMOKE_ARGS[@]}" \
  --checkpoint "$WORK/ckpt" --out "$RES" 2> "$RES/smoke.log"
r=$?; [ $r = 0 ] || tail -5 "$RES/smoke.log"
step "2. executor vs transformers ($DEVICE, $DTYPE)" $r $((SECONDS - t)); [ $r = 0 ] || rc=1

echo "== 3. hexplan profile --device $DEVICE"
t=$SECONDS
r=0
if [ -f "$WORK/ckpt/config.json" ]; then
  timeout $T_PROFILE "$PY" -m hexplan.cli profile --checkpoint "$WORK/ckpt" --device "$DEVICE" --dtype "$DTYPE" \
    "${PROFILE_ARGS[@]}" -o "$RES/profile.yaml" 2> "$RES/profile.log"
  r=$?
  [ $r = 0 ] && cat "$RES/profile.yaml" && "$PY" - "$RES/profile.yaml" "$WORK/ckpt" <<'PY'
# The profile read back as the cost model will: a cluster of that GPU type with the section merged.
import sys, yaml
from hexplan import loads_cluster
from hexplan.costmodel import decode_layer_time, lm_head_time, prefill_layer_time
from hexplan.models import load_model
section = yaml.safe_load(open(sys.argv[1]))
gpu = next(iter(section["gpu_types"]))
text = open(sys.argv[1]).read() + f"nodes:\n  - {{name: n0, gpu: {gpu}, count: 1}}\n"
cluster, model = loads_cluster(text, file="profile+node"), load_model(sys.argv[2])
tables = section["gpu_types"][gpu]["profiles"][model.name]
g = cluster.nodes[0].gpu
bad = [(b, ms) for b, ms in tables["decode_ms"].items() if abs(decode_layer_time(model, g, 1, b, 300, 1e9) * 1e3 - ms) > 1e-9]
bad += [(p, ms) for p, ms in tables["prefill_ms"].items() if abs(prefill_layer_time(model, g, 1, p, 1e9) * 1e3 - ms) > 1e-9]
bad += [(b, ms) for b, ms in tables.get("lm_head_ms", {}).items() if abs(lm_head_time(model, g, 1, b) * 1e3 - ms) > 1e-9]
print(f"profile of {model.name} on {gpu}: read back by the cost model", "OK" if not bad else f"MISMATCH {bad}")
sys.exit(1 if bad else 0)
PY
  r=$?
  [ $r = 0 ] || tail -5 "$RES/profile.log"
else
  echo "no checkpoint: step 2 did not make one"; r=1
fi
step "3. hexplan profile ($DEVICE, $DTYPE)" $r $((SECONDS - t)); [ $r = 0 ] || rc=1

{
  echo "# gpu_check.sh --device $DEVICE: $( [ $rc = 0 ] && echo PASS || echo FAIL ) in $((SECONDS - START)) s"
  echo
  head -2 "$RES/versions.txt"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  [ -f "$RES/smoke.md" ] && cat "$RES/smoke.md"
} > "$RES/summary.md"
echo
cat "$RES/summary.md"
exit $rc
