#!/usr/bin/env bash
# Input pipeline, per core: effnet's (decode + crop + flip + resize + RandAugment + normalize)
# against PIL + torchvision on the same ImageNet-sized JPEGs (made from the committed photos),
# same thread count, one run. Usage: tools/bench_pipeline.sh [THREADS] [MAGNITUDE]
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-1}"; magnitude="${2:-10}"
venv="${EFFNET_PEERS_VENV:-$HOME/.cache/effnet-peers}"
dir="$(mktemp -d)"
"$venv/bin/python" tools/bench_pipeline.py make "$dir"
cargo build --release -q
echo "# $(date -u +%FT%TZ) $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg), threads $threads, magnitude $magnitude"
ours=$(./target/release/effnet --threads "$threads" data_benchmark "$dir" --magnitude "$magnitude" --json)
peer=$("$venv/bin/python" tools/bench_pipeline.py run "$dir" --threads "$threads" --magnitude "$magnitude")
echo "$ours"; echo "$peer"
python3 -c "import json,sys; a=json.loads(sys.argv[1]); b=json.loads(sys.argv[2]); print(f\"effnet / peer per thread: {a['img_per_s_per_thread'] / b['img_per_s_per_thread']:.2f}x\")" "$ours" "$peer"
rm -rf "$dir"
