#!/usr/bin/env bash
# The GPU check of issue 7, as one script for a lent GPU machine (CUDA 13 image with PyTorch):
# the self-test against the CPU engine in f32, TF32, bf16 and f16 (AMP), then effnet's and PyTorch's benchmarks
# on the same GPU. Build here first (`cargo build --release --features cuda`) and carry
# target/release/effnet; everything is logged to $OUT/log (or ./gpu-check.log).
# Usage: tools/gpu_check.sh [quick]   (quick: the self-tests only)
# A short GPU training run on Fashion-MNIST too when .gpu-data/ holds its four .gz files: here,
#   mkdir -p .gpu-data && cp /usr/share/datasets/fashion-mnist/*.gz .gpu-data/ &&
#   echo /.gpu-data/ >> .git/info/exclude      (then carry .gpu-data with the binary)
set -uo pipefail
cd "$(dirname "$0")/.."
log="${OUT:-.}/gpu-check.log"
exec > >(tee "$log") 2>&1
# The CUDA libraries PyTorch's wheels and the toolkit bring: cuBLAS, cuDNN, NVRTC.
site=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
libdirs=$(find "$site/nvidia" /usr/local/cuda/lib64 -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"
nvidia-smi -L
bin=target/release/effnet
t0=$(date +%s)
# Smallest first: a failure names its cuDNN call in the log (CUDNN_LOGLEVEL_DBG=2).
CUDNN_LOGLEVEL_DBG=2 CUDNN_LOGDEST_DBG=stderr $bin selftest --batch-size 2 --img-size 32 --math f32 2> >(tail -40 >&2)
echo "selftest small rc=$?"
$bin selftest --math f32; echo "selftest f32 rc=$?"
$bin selftest --math tf32; echo "selftest tf32 rc=$?"
$bin selftest --math bf16; echo "selftest bf16 rc=$?"
$bin selftest --math f16; echo "selftest f16 rc=$?"
$bin selftest --arch efficientnet_lite0 --batch-size 3 --img-size 57 --math f32; echo "selftest lite0 odd size rc=$?"
# Real weights: predict on the GPU against the CPU engine, when .gpu-data/ holds lite0.pth and
# photos/ (here: cp "$EFFNET_LITE0_PTH" .gpu-data/lite0.pth; cp -r crates/cli/tests/fixtures/photos
# "$EFFNET_PHOTOS_DIR"/*.png .gpu-data/photos/ — the .gpu-data note above).
if [ -f .gpu-data/lite0.pth ] && [ -d .gpu-data/photos ]; then
  for dev in "cpu f32" "cuda f32" "cuda tf32" "cuda bf16" "cuda f16"; do
    set -- $dev
    $bin predict --arch efficientnet_lite0 --weights .gpu-data/lite0.pth .gpu-data/photos \
      --device $1 --math $2 --batch-size 4 --format csv --logits-out "/tmp/logits-$1-$2.npy" >/dev/null
    echo "predict $1 $2 rc=$?"
  done
  python3 - <<'PY'
import numpy as np
cpu = np.load("/tmp/logits-cpu-f32.npy")
for math in ("f32", "tf32", "bf16", "f16"):
    gpu = np.load(f"/tmp/logits-cuda-{math}.npy")
    err = np.abs(gpu - cpu).max() / np.abs(cpu).max()
    same = (gpu.argmax(1) == cpu.argmax(1)).mean()
    print(f"predict lite0 on {len(cpu)} photos, cuda {math}: max rel err {err:.2e}, top-1 agreement {same:.0%}")
PY
fi
echo "self-tests took $(( $(date +%s) - t0 )) s"
[ "${1:-}" = quick ] && exit 0
if [ -f .gpu-data/train-images-idx3-ubyte.gz ]; then
  for amp in --use-amp ""; do   # mixed precision, then TF32
    $bin train --device cuda --data-dir .gpu-data --arch efficientnetv2_b0 --epochs 1 \
      --batch-size 256 --img-size 28 --lr-init 0.004 --lr-decay cosine --lr-warmup-epochs 0.2 \
      --augmenter-name none --moving-average-decay 0.999 --log-steps 50 \
      --model-dir "/tmp/gpu-run$amp" $amp
    echo "gpu training ${amp:-tf32} rc=$?"
  done
fi
for math in bf16 tf32; do
  $bin inference_benchmark --device cuda --math $math --batch-size 1,8,128 --img-size 384 --json
  $bin training_benchmark --device cuda --math $math --batch-size 128 --img-size 300 --steps 10 --json
done
python3 tools/gpu_peer.py --runs 10
python3 tools/gpu_peer.py --runs 10 --compile --impls torch-amp-bf16-cl --cases train:128x300,infer:128x384
echo "total $(( $(date +%s) - t0 )) s"
