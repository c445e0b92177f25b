#!/usr/bin/env bash
# The GPU figures issue 8 asks for, in one go (for a lent `device` machine, or any CUDA host):
#   ResNet-18 and ResNet-50 at 224x224 and ResNet-20 at 32x32, jaxcnn against PyTorch in the same run, bfloat16
#   compute with float32 parameters, images/s, MFU and each compile time.
#
#   benchmarks/gpu.sh [OUT_DIR]        # default: $OUT if set, else ./gpu-results
#
# Expected runtime: under 9 minutes all told (the `device` tool allows 10 per command), most of it compiling;
# each command has its own time limit (45 + 150 + 330 s), so one that hangs does not take the others with it.
# Everything printed is kept in OUT_DIR/gpu.txt. Runs from the checkout without installing it (the benchmark scripts import this jaxcnn); the
# machine needs jax with CUDA, flax, optax and torch with CUDA.
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-results}}"
mkdir -p "$out"
log="$out/gpu.txt"
py="${PYTHON:-python3}"

run() {  # run LIMIT_S CMD...: one benchmark, its output appended to the log, a line if it fails
  local limit="$1"; shift
  echo "\$ $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | grep -v "^WARNING: All log messages before absl" | tee -a "$log"
  local rc="${PIPESTATUS[0]}"
  if [ "$rc" = 124 ]; then echo "(stopped: over its ${limit} s limit)" | tee -a "$log"
  elif [ "$rc" != 0 ]; then echo "(exit status $rc)" | tee -a "$log"; fi
}

: > "$log"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true; } | tee -a "$log"
run 45 "$py" -c "import jax, flax, optax, torch; print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', optax.__version__, '| torch', torch.__version__, 'cuda', torch.cuda.is_available())"
run 150 "$py" benchmarks/vs_pytorch.py --models resnet20 --dtype bfloat16 --batch 512 --rounds 5
run 330 "$py" benchmarks/vs_pytorch.py --models resnet18,resnet50 --image-size 224 --dtype bfloat16 --batch 256 --rounds 5
echo "figures in $log"
