#!/usr/bin/env python3
"""Writes the JPEG fixtures of crates/data/tests/jpeg_crop.rs: crops of the committed real photos
in every chroma subsampling the crop decoder supports, grayscale, restart intervals, odd sizes,
and a progressive file (which must fall back). Needs Pillow. Usage: make_jpeg_fixtures.py"""
import os
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
PHOTOS = os.path.join(HERE, "..", "crates", "cli", "tests", "fixtures", "photos")
OUT = os.path.join(HERE, "..", "crates", "data", "tests", "fixtures", "jpeg")


def photo(name, box, size):
    im = Image.open(os.path.join(PHOTOS, name)).convert("RGB")
    return im.crop(box).resize(size, Image.BICUBIC)


def main():
    os.makedirs(OUT, exist_ok=True)
    cat = photo("chelsea.png", (60, 20, 420, 280), (227, 149))
    cup = photo("coffee.png", (80, 40, 520, 380), (241, 187))
    fruit = photo("orange.jpg", (40, 60, 480, 420), (257, 171))
    files = {
        "cat_444.jpg": (cat, dict(subsampling="4:4:4", quality=88)),
        "cat_422.jpg": (cat, dict(subsampling="4:2:2", quality=88)),
        "cat_420.jpg": (cat, dict(subsampling="4:2:0", quality=88)),
        "cup_420_q95.jpg": (cup, dict(subsampling="4:2:0", quality=95)),
        "cup_gray.jpg": (cup.convert("L"), dict(quality=90)),
        # A restart interval that does not divide an MCU row, and one of a whole row.
        "fruit_420_restart7.jpg": (fruit, dict(subsampling="4:2:0", quality=90, restart_marker_blocks=7)),
        "fruit_444_restart_row.jpg": (fruit, dict(subsampling="4:4:4", quality=85, restart_marker_rows=1)),
        "fruit_gray_restart3.jpg": (fruit.convert("L"), dict(quality=90, restart_marker_blocks=3)),
        "tiny_420.jpg": (cat.resize((9, 7), Image.BICUBIC), dict(subsampling="4:2:0", quality=90)),
        "cat_420_progressive.jpg": (cat, dict(subsampling="4:2:0", quality=88, progressive=True)),
    }
    for name, (im, opts) in files.items():
        im.save(os.path.join(OUT, name), **opts)
        print(name, im.size, os.path.getsize(os.path.join(OUT, name)), "bytes")


if __name__ == "__main__":
    main()
