#!/usr/bin/env python3
"""PyTorch's EfficientNetV2-S on a CUDA GPU, the peer of `effnet ... --device cuda`.

One JSON object per line, the schema of ../shared/bench/README.md (plus "device"). Flavours:
`torch-tf32-cl` (f32 data, TF32 tensor cores, channels_last) and `torch-amp-bf16-cl` (autocast
bf16, channels_last), optionally `-compile` (torch.compile) when it works there. A training
step is zero_grad + forward (train-mode BN) + cross-entropy + backward + SGD(momentum 0.9),
as in peers.py; input already on the GPU; timed with CUDA synchronization.

Usage: gpu_peer.py [--arch tf_efficientnetv2_s] [--cases train:128x300,infer:1x384,...]
                   [--impls torch-tf32-cl,torch-amp-bf16-cl] [--runs 20] [--compile]
"""
import argparse
import json
import statistics
import time

import timm
import torch


def median_ms(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1000.0 * statistics.median(times)


def case(arch, impl, mode, batch, res, runs, compile_model):
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False).cuda().to(memory_format=torch.channels_last)
    if compile_model:
        model = torch.compile(model)
    x = torch.randn(batch, 3, res, res, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    amp = "bf16" in impl

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp)

    if mode == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                model(x)
    else:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

    ms = median_ms(step, 5 if not compile_model else 10, runs)
    return {
        "impl": f"pytorch-{torch.__version__.split('+')[0]}-{impl}" + ("-compile" if compile_model else ""),
        "arch": arch,
        "mode": mode,
        "batch": batch,
        "res": res,
        "median_ms": round(ms, 2),
        "img_per_s": round(batch * 1000.0 / ms, 2),
        "device": torch.cuda.get_device_name(0),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="tf_efficientnetv2_s")
    p.add_argument("--cases", default="train:128x300,infer:1x384,infer:8x384,infer:128x384")
    p.add_argument("--impls", default="torch-tf32-cl,torch-amp-bf16-cl")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--compile", action="store_true")
    a = p.parse_args()
    for c in a.cases.split(","):
        mode, shape = c.split(":")
        batch, res = (int(v) for v in shape.split("x"))
        for impl in a.impls.split(","):
            try:
                r = case(a.arch, impl, mode, batch, res, a.runs, a.compile)
            except Exception as e:  # a failing flavour (e.g. torch.compile) must not stop the rest
                r = {"impl": impl, "mode": mode, "batch": batch, "res": res, "error": repr(e)[:300]}
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
