"""A stress case for near-constant regions: one MVTec-layout category, each image shrunk onto a near-black frame.

Objects photographed on a dark, featureless background that they do not fill (a rubber part on black
felt) made the CPU preset's scores light up the background (before its spread floor, docs/quality.md):
per-position standardisation divides by the spread of the training features at each position, and where
every training image is the same black that spread is sensor noise. Such data is not among the development
categories, so this builds it from one: every image (and its mask) is scaled by ``--scale`` and pasted,
centred with a small seeded jitter, onto a canvas of grey level ``--level`` plus seeded Gaussian noise of
``--noise`` grey levels; ``--gain`` below 1 darkens the object itself (a dark, low-contrast part, its defects
fainter with it). ``--test-level`` and ``--test-noise`` give the test images (and so the validation
part) another background than the training images, as when the black is not the same black in test
(another sensor gain, more noise). The output is an MVTec-layout tree that ``data=mvtec`` reads::

    python -m experiments.dark_frame data/mvtec_bottle bottle /tmp/dark_frame
    python -m experiments.dark_frame data/mvtec_bottle bottle /tmp/dark_shift --level 0 --noise 0 \\
        --test-level 6 --test-noise 1.5
    python -m experiments.quality --data mvtec --set data.root=/tmp/dark_shift --set "data.categories=[bottle]" \\
        --split validation --skip-patchcore --row "floor0=model.flow.standardize_floor=0"

It is a synthetic variant of real images for checking a mechanism, not a benchmark category: report it as such.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _rng(seed: int, rel: Path) -> np.random.Generator:
    """A generator keyed by the seed and the file's path: an image and its mask get the same offset."""
    key = str(rel.with_suffix("")).removesuffix("_mask").replace("ground_truth", "test")
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def framed(
    img: Image.Image,
    rng: np.random.Generator,
    scale: float,
    level: float,
    noise: float,
    mask: bool,
    gain: float = 1.0,
) -> Image.Image:
    """``img`` scaled by ``scale`` (its grey levels by ``gain``) on a canvas of its size: noisy near-black for an
    image, zero for a mask."""
    w, h = img.size
    small = img.resize(
        (round(w * scale), round(h * scale)), Image.Resampling.NEAREST if mask else Image.Resampling.BILINEAR
    )
    if not mask and gain != 1.0:
        dark = np.clip(np.rint(np.asarray(small, dtype=np.float64) * gain), 0, 255).astype(np.uint8)
        small = Image.fromarray(dark, mode=small.mode)
    jitter = max(1, round(0.02 * min(w, h)))
    dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
    noise_rng = np.random.default_rng(rng.integers(2**63))  # drawn after the offset, so masks stay aligned
    if mask:
        canvas = Image.new(img.mode, (w, h), 0)
    else:
        bands = len(img.getbands())
        values = level + noise * noise_rng.standard_normal((h, w, bands))
        array = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        canvas = Image.fromarray(array[..., 0] if bands == 1 else array, mode=img.mode)
    canvas.paste(small, ((w - small.width) // 2 + dx, (h - small.height) // 2 + dy))
    return canvas


def build(
    root: Path,
    category: str,
    out: Path,
    scale: float,
    level: float,
    noise: float,
    seed: int,
    test_level: float | None = None,
    test_noise: float | None = None,
    gain: float = 1.0,
) -> int:
    """Write the framed copy of ``root/category`` to ``out/category``; returns the number of files written.

    ``test_level`` / ``test_noise`` (None: as in training) are the background of the test images; ``gain``
    scales the object's grey levels in every image."""
    source = root / category
    if not (source / "train" / "good").is_dir():
        msg = f"{source} is not an MVTec-layout category (no train/good folder)."
        raise FileNotFoundError(msg)
    if not 0.1 <= scale <= 1.0:
        msg = f"--scale must be in [0.1, 1], got {scale}."
        raise ValueError(msg)
    if not 0.05 <= gain <= 1.0:
        msg = f"--gain must be in [0.05, 1] (1 keeps the object's grey levels), got {gain}."
        raise ValueError(msg)
    written = 0
    for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        rel = path.relative_to(source)
        is_mask = rel.parts[0] == "ground_truth"
        is_test = rel.parts[0] == "test"
        lvl = test_level if is_test and test_level is not None else level
        sd = test_noise if is_test and test_noise is not None else noise
        with Image.open(path) as img:
            img.load()
            mode = img.mode if img.mode in ("L", "RGB") else ("L" if is_mask else "RGB")
            result = framed(img.convert(mode), _rng(seed, rel), scale, lvl, sd, is_mask, gain)
        target = (out / category / rel).with_suffix(".png")  # lossless: the noise is part of the image
        target.parent.mkdir(parents=True, exist_ok=True)
        result.save(target)
        written += 1
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="MVTec-layout data root")
    parser.add_argument("category")
    parser.add_argument("out", type=Path)
    parser.add_argument("--scale", type=float, default=0.55, help="object size as a share of the frame")
    parser.add_argument("--level", type=float, default=6.0, help="background grey level (0-255)")
    parser.add_argument("--noise", type=float, default=1.5, help="background noise, grey levels (std)")
    parser.add_argument("--test-level", type=float, default=None, help="test images' level (default: --level)")
    parser.add_argument("--test-noise", type=float, default=None, help="test images' noise (default: --noise)")
    parser.add_argument("--gain", type=float, default=1.0, help="object grey levels times this (< 1: a dark part)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = build(
        args.root,
        args.category,
        args.out,
        scale=args.scale,
        level=args.level,
        noise=args.noise,
        seed=args.seed,
        test_level=args.test_level,
        test_noise=args.test_noise,
        gain=args.gain,
    )
    print(f"Wrote {n} files to {args.out / args.category}")


if __name__ == "__main__":
    main()
