#!/usr/bin/env python3
"""Where ONNX Runtime spends an inference pass, per operation kind, to set beside
`effnet inference_benchmark --profile` (same machine, same threads).

Usage (the peers' venv, ../shared/bench/setup-peers.sh):
  ~/.cache/effnet-peers/bin/python tools/ort_profile.py [--model M.onnx] [--batch 8] [--threads 2]
The model defaults to the one ../shared/bench/peers.py exports (tf_efficientnetv2_s at 224 px);
run peers.py once with `--impls ort-fp32` to make it. Convolutions are split by kernel size and
depthwise (group > 1), as ORT fuses them after graph optimization.
"""
import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnx
import onnxruntime as ort


def main():
    ap = argparse.ArgumentParser()
    default = os.path.join(tempfile.gettempdir(), "effnet-peers-onnx", "tf_efficientnetv2_s_224.onnx")
    ap.add_argument("--model", default=default)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="effnet-ort-profile-")
    so = ort.SessionOptions()
    so.log_severity_level = 3  # the optimized model is saved only to read node attributes back
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = os.path.join(work, "optimized.onnx")
    so.enable_profiling = True
    so.profile_file_prefix = os.path.join(work, "profile")
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((args.batch, 3, args.res, args.res), dtype=np.float32)
    warmup = 2
    for _ in range(warmup + args.runs):
        sess.run(None, {sess.get_inputs()[0].name: x})
    events = json.load(open(sess.end_profiling()))

    graph = onnx.load(so.optimized_model_filepath).graph
    attrs = {n.name: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in graph.node}
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    timed_from = runs[warmup]["ts"]  # leave the warm-up runs out
    per_kind = collections.defaultdict(float)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["ts"] < timed_from:
            continue
        node = e["name"][: -len("_kernel_time")]
        kind = e["args"].get("op_name", "?")
        a = attrs.get(node, {})
        if "Conv" in kind:
            kernel = a.get("kernel_shape", ["?"])[0]
            kind = f"{kind} {kernel}x{kernel}" + (" depthwise" if a.get("group", 1) > 1 else "")
        per_kind[kind] += e["dur"] / 1000 / args.runs
    total = sum(per_kind.values())
    print(f"ONNX Runtime {ort.__version__}, batch {args.batch} at {args.res} px, {args.threads} threads: "
          f"{total:.1f} ms per pass in kernels, {1000 * args.batch / total:.1f} img/s")
    for kind, ms in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        if ms >= 0.005 * total:
            print(f"{kind:32s} {ms:9.2f} ms {100 * ms / total:6.1f} %")


if __name__ == "__main__":
    main()
