"""Write an ImageNet-like ImageFolder of synthetic JPEGs, for timing the input pipeline
(`vitlab bench --input`): CLASSES folders of PER_CLASS photos-sized images (3/4 of them 500x375,
the rest 375x500), smooth random colour fields plus pixel noise, JPEG quality 90 (~60 KB each).

    python scripts/make_jpeg_folder.py /tmp/inet --classes 10 --per-class 200
"""
import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    for c in range(args.classes):
        folder = Path(args.out) / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(args.per_class):
            w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
            coarse = rng.integers(0, 256, (h // 24, w // 24, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)).astype(np.int16)
            noisy = smooth + rng.normal(0, 8, (h, w, 3)).astype(np.int16)
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{c}_{i}.JPEG", quality=90)
    print(f"{args.classes * args.per_class} JPEGs under {args.out}")


if __name__ == "__main__":
    main()
