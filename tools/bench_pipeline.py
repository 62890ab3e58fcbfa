#!/usr/bin/env python3
"""The peers' side of the input-pipeline benchmark, and its test images.

  bench_pipeline.py make DIR      writes 64 ImageNet-sized JPEGs (about 500×375, quality 90) made
                                  from the committed real photos (crops, scales, flips)
  bench_pipeline.py run DIR [--threads 1] [--size 224] [--magnitude 10] [--passes 3]
                                  PIL decode + torchvision RandomResizedCrop, RandomHorizontalFlip,
                                  RandAugment(2, M), ToTensor, Normalize; one JSON line, the schema of
                                  `effnet data_benchmark --json`. Threads = worker processes.
Run inside the peers' venv (../shared/bench/setup-peers.sh).
"""
import glob
import json
import os
import sys
import time
from multiprocessing import Pool

PHOTOS = os.path.join(os.path.dirname(__file__), "..", "crates", "cli", "tests", "fixtures", "photos")


def make(out):
    from PIL import Image
    os.makedirs(out, exist_ok=True)
    photos = [Image.open(p).convert("RGB") for p in sorted(glob.glob(os.path.join(PHOTOS, "*.*g")))]
    for i in range(64):
        im = photos[i % len(photos)]
        w, h = im.size
        # A different crop and scale of each photo, resized to ImageNet's typical 500×375 (or 375×500).
        f = 0.6 + 0.4 * ((i * 37) % 11) / 10
        cw, ch = int(w * f), int(h * f)
        left, top = (w - cw) * ((i * 13) % 7) // 6, (h - ch) * ((i * 5) % 5) // 4
        crop = im.crop((left, top, left + cw, top + ch))
        size = (500, 375) if i % 4 else (375, 500)
        crop = crop.resize(size, Image.BICUBIC)
        if i % 2:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crop.save(os.path.join(out, f"img{i:03d}.jpg"), quality=90)
    print(f"wrote 64 JPEGs to {out}")


def work(job):
    import torch
    from PIL import Image
    from torchvision import transforms as T
    torch.set_num_threads(1)
    paths, size, magnitude, passes = job
    tf = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    if magnitude > 0:
        tf.append(T.RandAugment(num_ops=2, magnitude=int(magnitude)))
    tf += [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    tf = T.Compose(tf)
    for _ in range(passes):
        for p in paths:
            tf(Image.open(p).convert("RGB"))
    return len(paths) * passes


def run(folder, threads, size, magnitude, passes):
    paths = sorted(glob.glob(os.path.join(folder, "*.jpg")))
    work((paths[:2], size, magnitude, 1))  # warm-up
    jobs = [(paths[i::threads], size, magnitude, passes) for i in range(threads)]
    start = time.perf_counter()
    with Pool(threads) as pool:
        count = sum(pool.map(work, jobs))
    ips = count / (time.perf_counter() - start)
    import PIL
    import torchvision
    print(json.dumps({"impl": f"pil-{PIL.__version__}+torchvision-{torchvision.__version__}", "mode": "pipeline",
                      "res": size, "magnitude": magnitude, "img_per_s": round(ips, 2),
                      "img_per_s_per_thread": round(ips / threads, 2), "threads": threads}))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) >= 3 and sys.argv[1] == "run":
        import argparse
        ap = argparse.ArgumentParser()
        ap.add_argument("cmd")
        ap.add_argument("folder")
        ap.add_argument("--threads", type=int, default=1)
        ap.add_argument("--size", type=int, default=224)
        ap.add_argument("--magnitude", type=float, default=10)
        ap.add_argument("--passes", type=int, default=3)
        a = ap.parse_args()
        run(a.folder, a.threads, a.size, a.magnitude, a.passes)
    else:
        sys.exit(__doc__)
