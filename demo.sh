#!/usr/bin/env bash
# The main job: a short real training run (EfficientNetV2-B0 from scratch on Fashion-MNIST, the
# reference's recipe: RMSProp, warmup + cosine, label smoothing, EMA) that ends with predictions
# on test images, then the trained model used through `effnet eval`-style evaluation.
# Installs Debian's dataset-fashion-mnist when missing. About two minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
fi
cargo build --release
./target/release/effnet train --arch efficientnetv2_b0 --img-size 32 --max-train-images 9600 --max-eval-images 2000 \
  --epochs 2 --batch-size 64 --bn-momentum 0.9 --model-dir effnet-run "$@"
