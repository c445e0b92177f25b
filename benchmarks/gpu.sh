#!/usr/bin/env bash
# The GPU figures, in one go (for a lent `device` machine, or any CUDA host):
#   ResNet-18 and ResNet-50 at 224x224 and ResNet-20 at 32x32, jaxcnn against PyTorch in the same run, bfloat16
#   compute with float32 parameters, images/s, MFU and each compile time.
#
#   benchmarks/gpu.sh [OUT_DIR]        # default: $OUT if set, else ./gpu-results (relative to where it is run)
#
# Expected runtime: at most 525 s, the sum of the commands' time limits (45 + 150 + 330 s, so the whole fits one
# 10-minute `device` call; not yet run on a GPU), most of it compiling. Each command has its own limit, so one
# that hangs does not take the others with it (GPU_SH_LIMIT_S=N sets every limit to N s). Everything printed is
# kept in OUT_DIR/gpu.txt; the exit status is 1 when any command failed or ran out of time. Runs from the checkout
# without installing it (the benchmark scripts import this jaxcnn); the machine needs jax with CUDA, flax, optax
# and torch with CUDA ($PYTHON, default python3).
set -u
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
case "$py" in */*) py="$(cd "$(dirname "$py")" && pwd)/$(basename "$py")" ;; esac
cd "$(dirname "$0")/.."
log="$out/gpu.txt"
# JAX would take 75% of the GPU's memory up front; PyTorch's process shares the GPU.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
failed=0

run() {  # run LIMIT_S CMD...: one benchmark, its output appended to the log, a line if it fails
  local limit="${GPU_SH_LIMIT_S:-$1}"; shift
  echo "\$ $*" | tee -a "$log"
  timeout -k 10 "$limit" "$@" 2>&1 | grep -v "^WARNING: All log messages before absl" | tee -a "$log"
  local rc="${PIPESTATUS[0]}"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then echo "(stopped: over its ${limit} s limit)" | tee -a "$log"
  elif [ "$rc" != 0 ]; then echo "(exit status $rc)" | tee -a "$log"; fi
  [ "$rc" = 0 ] || failed=1
}

: > "$log"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true; } | tee -a "$log"
run 45 "$py" -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, 'cuda', torch.cuda.is_available())"
run 150 "$py" benchmarks/vs_pytorch.py --models resnet20 --dtype bfloat16 --batch 512 --rounds 5
run 330 "$py" benchmarks/vs_pytorch.py --models resnet18,resnet50 --image-size 224 --dtype bfloat16 --batch 256 --rounds 5
echo "figures in $log"
exit "$failed"
