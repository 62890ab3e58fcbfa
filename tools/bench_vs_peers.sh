#!/usr/bin/env bash
# effnet's benchmarks and the peers' (PyTorch, ONNX Runtime) back to back, same machine, same
# threads, then the ratios and each side's peak RSS as Markdown tables (those in
# docs/benchmarks.md). Usage:
#   tools/bench_vs_peers.sh [THREADS] [CASES] [ROUNDS]   e.g. tools/bench_vs_peers.sh 2 infer:1x224,train:8x128 3
# ROUNDS (default 1) repeats the whole comparison: on a shared machine whose speed drifts
# between minutes, one round's ratio can be off by ±20 %; the table gives every round's ratio and
# their median.
# Needs the peers' venv: ../shared/bench/setup-peers.sh (default $HOME/.cache/effnet-peers).
# EFFNET_PEER_IMPLS picks the peers' flavours (peers.py --impls); EFFNET_ARCH the architecture;
# EFFNET_PRECISIONS effnet's precisions, comma separated (default f32; bf16 needs AVX512_BF16:
# inference's 1×1 expansions, or training's every product as `train --use-amp` runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
cases="${2:-infer:1x224,infer:8x224,train:8x128,train:8x224}"
rounds="${3:-1}"
venv="${EFFNET_PEERS_VENV:-$HOME/.cache/effnet-peers}"
peers="${EFFNET_PEERS_PY:-../shared/bench/peers.py}"
arch="${EFFNET_ARCH:-efficientnetv2_s}"
impls="${EFFNET_PEER_IMPLS:-torch-fp32,torch-fp32-cl,torch-bf16-cl,ort-fp32}"
precisions="${EFFNET_PRECISIONS:-f32}"
out="$(mktemp -d)"
cargo build --release -q
echo "# $(date -u +%FT%TZ) $(uname -m) $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg), threads $threads, $rounds round(s)" | tee "$out/header"
# Case by case: effnet and the peers on the same case, so that the figures a ratio compares
# are taken seconds apart rather than after every other case; effnet first in odd rounds, the
# peers first in even ones, so that a machine speeding up or slowing down within a case favours
# neither side across rounds.
run_effnet() {
  for precision in ${precisions//,/ }; do
    ./target/release/effnet --threads "$threads" "$sub" --arch "$arch" --batch-size "$batch" --img-size "$res" \
      --steps "$steps" --precision "$precision" --json | sed "s/^{/{\"round\":$round,/" | tee -a "$out/results.jsonl"
  done
}
# One process per peer flavour, so that each figure's peak RSS (the whole process's, interpreter
# and libraries included, as effnet's `peak_rss_mib` is its own process's) is that flavour's.
peak_rss='import resource, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("peak_rss_mib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)'
run_peers() {
  for impl in ${impls//,/ }; do
    lines="$("$venv/bin/python" -c "$peak_rss" "$peers" --arch "tf_$arch" --threads "$threads" --cases "$case" \
      --impls "$impl" 2> >(grep -v -i warning >&2))"
    rss="$(sed -n 's/^peak_rss_mib //p' <<<"$lines")"
    grep '^{' <<<"$lines" | sed "s/^{/{\"round\": $round, \"peak_rss_mib\": ${rss:-null}, /" \
      | tee -a "$out/results.jsonl" || true
  done
}
for round in $(seq "$rounds"); do
  for case in ${cases//,/ }; do
    mode="${case%%:*}"; shape="${case#*:}"; batch="${shape%x*}"; res="${shape#*x}"
    sub=$([ "$mode" = infer ] && echo inference_benchmark || echo training_benchmark)
    steps=$([ "$mode" = infer ] && echo 15 || echo 8)
    if (( round % 2 )); then run_effnet; run_peers; else run_peers; run_effnet; fi
  done
done
"$venv/bin/python" - "$out/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
key = lambda r: (r["mode"], r["batch"], r["res"])
cases = list(dict.fromkeys(key(r) for r in rows if r["impl"].startswith("effnet")))
ours_impls = list(dict.fromkeys(r["impl"] for r in rows if r["impl"].startswith("effnet")))
peers = list(dict.fromkeys(r["impl"] for r in rows if not r["impl"].startswith("effnet")))
# A row's first two cells: the case, and effnet's precision.
label = lambda case, impl: f"| {case[0]} bs{case[1]}@{case[2]} | {impl.rsplit('-', 1)[-1]} | "
rate = lambda impl, case: {r["round"]: r["img_per_s"] for r in rows if r["impl"] == impl and key(r) == case}
print("\n| case | effnet | img/s | " + " | ".join(f"{p} img/s | ratio" for p in peers) + " |")
print("|---|---|---|" + "---|---|" * len(peers))
for case, impl in ((c, i) for c in cases for i in ours_impls):
    ours = rate(impl, case)
    if not ours:
        continue
    cells = [" / ".join(f"{v:.1f}" for v in ours.values())]
    for p in peers:
        theirs = rate(p, case)
        ratios = [ours[k] / theirs[k] for k in ours if k in theirs]
        if not ratios:
            cells += ["–", "–"]
            continue
        per_round = " / ".join(f"{x:.2f}" for x in ratios)
        median = f" (median **{statistics.median(ratios):.2f}×**)" if len(ratios) > 1 else "×"
        cells += [" / ".join(f"{v:.1f}" for v in theirs.values()), per_round + median]
    print(label(case, impl) + " | ".join(cells) + " |")
# Peak memory: each side's largest over the rounds, and effnet's as a fraction of each peer's.
rss = lambda impl, case: max((r["peak_rss_mib"] for r in rows if r["impl"] == impl and key(r) == case
                              and r.get("peak_rss_mib")), default=None)
print("\n| case | effnet | peak RSS MiB | " + " | ".join(f"{p} MiB | effnet / it" for p in peers) + " |")
print("|---|---|---|" + "---|---|" * len(peers))
for case, impl in ((c, i) for c in cases for i in ours_impls):
    ours = rss(impl, case)
    if ours is None:
        continue
    cells = [f"{ours:,.0f}"]
    for p in peers:
        theirs = rss(p, case)
        cells += ["–", "–"] if theirs is None else [f"{theirs:,.0f}", f"{ours / theirs:.2f}×"]
    print(label(case, impl) + " | ".join(cells) + " |")
PY
