#!/usr/bin/env bash
# effnet's benchmarks and the peers' (PyTorch, ONNX Runtime) back to back, same machine, same
# threads, then the ratios. Usage:
#   tools/bench_vs_peers.sh [THREADS] [CASES]     e.g. tools/bench_vs_peers.sh 2 infer:1x224,infer:8x224,train:8x128
# Needs the peers' venv: ../shared/bench/setup-peers.sh (default $HOME/.cache/effnet-peers).
# EFFNET_PEER_IMPLS picks the peers' flavours (peers.py --impls); EFFNET_ARCH the architecture.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
cases="${2:-infer:1x224,infer:8x224,train:8x128,train:8x224}"
venv="${EFFNET_PEERS_VENV:-$HOME/.cache/effnet-peers}"
peers="${EFFNET_PEERS_PY:-../shared/bench/peers.py}"
arch="${EFFNET_ARCH:-efficientnetv2_s}"
out="$(mktemp -d)"
cargo build --release -q
echo "# $(date -u +%FT%TZ) $(uname -m) $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg), threads $threads" | tee "$out/header"
for case in ${cases//,/ }; do
  mode="${case%%:*}"; shape="${case#*:}"; batch="${shape%x*}"; res="${shape#*x}"
  sub=$([ "$mode" = infer ] && echo inference_benchmark || echo training_benchmark)
  steps=$([ "$mode" = infer ] && echo 15 || echo 8)
  ./target/release/effnet --threads "$threads" "$sub" --arch "$arch" --batch-size "$batch" --img-size "$res" \
    --steps "$steps" --json | tee -a "$out/results.jsonl"
done
impls="${EFFNET_PEER_IMPLS:-torch-fp32,torch-fp32-cl,torch-bf16-cl,ort-fp32}"
"$venv/bin/python" "$peers" --arch "tf_$arch" --threads "$threads" --cases "$cases" --impls "$impls" \
  2> >(grep -v -i warning >&2) | tee -a "$out/results.jsonl"
"$venv/bin/python" - "$out/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
ours = [r for r in rows if r["impl"].startswith("effnet")]
print(f"\n{'case':<14}{'effnet img/s':>14}  ratios vs peers")
for o in ours:
    peers = [r for r in rows if not r["impl"].startswith("effnet") and (r["mode"], r["batch"], r["res"]) == (o["mode"], o["batch"], o["res"])]
    ratios = ", ".join(f"{p['impl']} {p['img_per_s']:.1f} → {o['img_per_s'] / p['img_per_s']:.2f}x" for p in peers)
    print(f"{o['mode']} {o['batch']}x{o['res']:<8}{o['img_per_s']:>14.1f}  {ratios}")
PY
