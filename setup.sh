#!/usr/bin/env bash
# Sets up jaxcnn on a fresh machine: Debian's Fashion-MNIST package (when missing and apt is usable) and the Python
# packages (editable install). Idempotent: a second run only checks.
#   ./setup.sh            the package and what training needs
#   ./setup.sh --tests    also pytest, hypothesis, chex, TensorFlow (TFDS dataset preparation, used by tests),
#                         safetensors and huggingface_hub, and PyTorch, torchvision and timm (the references of
#                         tests/pretrained) where PyTorch has a wheel for this Python
# PYTHON=/path/to/python ./setup.sh   uses another interpreter (Python 3.11 gives jax 0.10, 3.12 gives jax 0.12).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
extras=""
if [ "${1:-}" = "--tests" ]; then extras="[test,tf,pretrained]"; fi

# apt_install PKG...: Debian packages, as root or with sudo; returns 1 when apt is not usable here.
apt_install() {
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q "$@" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "$@" >/dev/null; }
  elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -q >/dev/null && sudo apt-get install -y -q "$@" >/dev/null
  else
    return 1
  fi
}

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  echo "setup: installing Debian's dataset-fashion-mnist (Fashion-MNIST into $FMNIST)"
  if ! apt_install dataset-fashion-mnist; then
    echo "setup: Fashion-MNIST is not in $FMNIST and apt-get is not usable here." >&2
    echo "       Either install the Debian package dataset-fashion-mnist, or download the four official files" >&2
    echo "       (train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz" >&2
    echo "       t10k-labels-idx1-ubyte.gz) from https://github.com/zalandoresearch/fashion-mnist into a folder" >&2
    echo "       and train with --set data.data_dir=FOLDER (or export JAXCNN_DATA_DIR=FOLDER)." >&2
  fi
fi

# jaxcnn.backends.cpu compiles its CPU kernels (oneDNN through XLA FFI) on first use: g++ and oneDNN.
if ! command -v g++ >/dev/null 2>&1 || [ ! -f /usr/include/oneapi/dnnl/dnnl.hpp ]; then
  echo "setup: installing g++ and Debian's libdnnl-dev (oneDNN, for the fast CPU convolutions)"
  if ! apt_install g++ libdnnl-dev; then
    echo "setup: could not install g++ / libdnnl-dev: jaxcnn will use XLA's CPU convolutions (2-10x slower)." >&2
  fi
fi

if ! "$PYTHON" -c "import jaxcnn, jax, flax, optax, orbax.checkpoint, tensorflow_datasets, tensorboardX" 2>/dev/null \
   || [ -n "$extras" ]; then
  echo "setup: pip install -e .$extras with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m pip install -q --disable-pip-version-check -e ".$extras" 2>&1 | grep -v -E "^WARNING: (Running pip as|Location)" || true
fi

# tests/pretrained's references: PyTorch 2.13 (the CPU build), then torchvision and timm without their dependencies
# (torchvision's would replace it with the CUDA build). Where PyTorch has no wheel for this Python, those tests skip.
if [ -n "$extras" ]; then
  if "$PYTHON" -m pip install -q --disable-pip-version-check -e ".[pretrained-test]" >/tmp/jaxcnn-setup-torch.log 2>&1 \
     && "$PYTHON" -m pip install -q --disable-pip-version-check --no-deps torchvision==0.28.0 timm==1.0.31 \
        >>/tmp/jaxcnn-setup-torch.log 2>&1; then
    echo "setup: PyTorch $("$PYTHON" -c 'import torch; print(torch.__version__)'), torchvision 0.28.0, timm 1.0.31 (tests/pretrained)"
  else
    echo "setup: PyTorch 2.13.0 / torchvision / timm could not be installed for $("$PYTHON" --version 2>&1) (see" \
         "/tmp/jaxcnn-setup-torch.log): the tests comparing with them will skip" >&2
  fi
fi
"$PYTHON" -c "import jax, flax; print(f'setup: ready (jax {jax.__version__}, flax {flax.__version__})')"
