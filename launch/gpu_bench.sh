#!/usr/bin/env bash
# The GPU benchmarks in one go (issue 27, item 6), on the GPU host itself, from any directory:
#   launch/gpu_bench.sh
#   SKIP_INSTALL=1 OUT=bench/results/gpu_h100_run2 launch/gpu_bench.sh     # .venv already set up
#
# 1. installs: scripts/setup.sh --test (the package with the test extra, the model packages), then
#    jax[$JAX_EXTRA] (default cuda12); checks that JAX sees a GPU.
# 2. runs, each under its own time limit (T_WHOLE + 2 x T_STEP + T_GEN = 460 s by default, so the four
#    benchmarks take under 8 minutes after the install; a step that hits its limit keeps what it finished):
#    - bench.whole_run on $WHOLE_SETTINGS (default ioi,refusal: no offline corpus needed; with unlearning
#      or tpp the corpus is built first, ~40 s), cold and warm compilation cache, a cache folder per
#      setting (each setting's cold and warm runs back to back)
#    - bench.recovery_throughput on SmolLM2-135M, IOI-shaped at batch 64 and 256 and refusal-shaped at
#      batch 8, in float32 and in bfloat16 (% of the measured peak: best jitted f32 matmul up to 8192^3)
#    - bench.generation: batch 16, 128 new tokens, JAX (with and without the clamp) vs transformers'
#      generate on the same GPU when torch sees CUDA (else on the host's CPU), % of the same peak
# 3. writes $OUT/benchmark_rows.md: the device, versions, load averages, and every benchmark's table with
#    its command, ready to paste into docs/benchmarks.md. Results: $OUT/ (default bench/results/gpu_<date>).
#
# Environment: OUT, SKIP_INSTALL=1, JAX_EXTRA, WHOLE_SETTINGS, T_WHOLE (220), T_STEP (75), T_GEN (90);
# TINY=1: tiny random models and no GPU check (a CPU smoke test of this script; its figures mean nothing).
set -uo pipefail  # no -e: a benchmark that fails or times out leaves the others to run
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_$(date +%F)}
WHOLE_SETTINGS=${WHOLE_SETTINGS:-ioi,refusal}
T_WHOLE=${T_WHOLE:-220}; T_STEP=${T_STEP:-75}; T_GEN=${T_GEN:-90}
PY=.venv/bin/python
export HF_HUB_OFFLINE=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and torch share the GPU in bench.generation
mkdir -p "$OUT"

if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  t0=$SECONDS
  bash scripts/setup.sh --test || { echo "error: scripts/setup.sh --test failed" >&2; exit 1; }
  $PY -m pip install -q -U "jax[${JAX_EXTRA:-cuda12}]" ||
    { echo "error: pip install jax[${JAX_EXTRA:-cuda12}] failed" >&2; exit 1; }
  echo "install: $((SECONDS - t0)) s"
fi
if [ "${TINY:-0}" = 1 ]; then  # a CPU smoke test of this script: tiny random models, no GPU needed
  WHOLE_FLAGS="--tiny"
  STEP_ARGS="--no_torch --models=tiny-llama --workloads=ioi --ioi_batches=2 --k_max=8 --ioi_steps=2 --ref_examples=1 \
--d_sae=128 --repeats=1 --peak_sizes=128"
  GEN_FLAGS="--tiny --batch=2 --new_tokens=4 --repeats=1 --peak_sizes=128"
else
  $PY -c "import jax, sys
sys.exit(0 if jax.default_backend() == 'gpu' else 'error: JAX sees no GPU: %s' % jax.devices())" || exit 1
  WHOLE_FLAGS=""
  STEP_ARGS="--no_torch --models=smollm2-135m --workloads=ioi,refusal --ioi_batches=64,256 --refusal_batches=8 \
--k_max=64 --ioi_steps=10 --refusal_steps=3 --ref_examples=2 --refusal_ref_examples=1 --repeats=2 \
--peak_sizes=2048,4096,8192"
  GEN_FLAGS="--batch=16 --new_tokens=128 --repeats=3 --peak_sizes=2048,4096,8192"
fi
case ",$WHOLE_SETTINGS," in *,unlearning,*|*,tpp,*) make corpus || exit 1 ;; esac
TORCH_DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo cpu)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
t_all=$SECONDS

declare -a STATUS
step() {  # step NAME LIMIT_S COMMAND...: runs the command under `timeout`, logs to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local t=$SECONDS
  echo "== $name (limit $limit s): $*"
  timeout -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local what="exit $rc"; [ $rc = 124 ] || [ $rc = 137 ] && what="stopped at its $limit s limit"
  STATUS+=("$name: $what after $((SECONDS - t)) s")
  echo "   $what after $((SECONDS - t)) s (log $OUT/$name.log)"
}

CMD_WHOLE="$PY -m bench.whole_run $WHOLE_FLAGS --settings=$WHOLE_SETTINGS --both --cache_per_setting \
--workroot=$OUT/whole_run_work --out=$OUT/whole_run.json"
CMD_F32="$PY -m bench.recovery_throughput $STEP_ARGS --dtype=float32 --out_dir=$OUT/step_f32"
CMD_BF16="$PY -m bench.recovery_throughput $STEP_ARGS --dtype=bfloat16 --out_dir=$OUT/step_bf16"
CMD_GEN="$PY -m bench.generation $GEN_FLAGS --torch_device=$TORCH_DEVICE --out=$OUT/generation.json"
step whole_run "$T_WHOLE" $CMD_WHOLE
step step_f32 "$T_STEP" $CMD_F32
step step_bf16 "$T_STEP" $CMD_BF16
step generation "$T_GEN" $CMD_GEN

section() {  # section TITLE COMMAND MARKDOWN_FILE PARTIAL_HINT
  printf '\n## %s\n\n```bash\n%s\n```\n\n' "$1" "$2"
  if [ -s "$3" ]; then cat "$3"; else printf 'Did not finish within its limit: %s\n' "$4"; fi
}
ROWS=$OUT/benchmark_rows.md
{
  echo "# GPU benchmarks, $(date +%F) (launch/gpu_bench.sh)"
  echo
  echo "- Device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || echo '?')"
  echo "- Host: $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs"
  echo "- $($PY -c "import jax, torch; print(f'jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__}')" 2>/dev/null); transformers' generate on $TORCH_DEVICE"
  echo "- Commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "- 1-min / 5-min / 15-min load average: $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end; benchmarks $((SECONDS - t_all)) s"
  echo "- % of peak: model FLOPs (bench/flops.py) over the best jitted f32 matmul measured in the same run (XLA's default precision: TF32 on NVIDIA)"
  for s in "${STATUS[@]}"; do echo "- $s"; done
  section "Whole runs: cold and warm compilation cache ($WHOLE_SETTINGS, $([ "${TINY:-0}" = 1 ] && echo tiny || echo demo) size)" \
    "$CMD_WHOLE" \
    "$OUT/whole_run.md" "$OUT/whole_run.json holds the runs that finished"
  section "Recovery step, float32" "$CMD_F32" "$OUT/step_f32/recovery_throughput.md" \
    "$OUT/step_f32/recovery_throughput.partial.json holds the finished cells"
  section "Recovery step, bfloat16" "$CMD_BF16" "$OUT/step_bf16/recovery_throughput.md" \
    "$OUT/step_bf16/recovery_throughput.partial.json holds the finished cells"
  section "Generation: KV-cached JAX decoder vs transformers' generate" "$CMD_GEN" "$OUT/generation.md" \
    "see $OUT/generation.log"
} > "$ROWS"
echo "wrote $ROWS"
