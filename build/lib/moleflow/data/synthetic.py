"""Deterministic generator of a small MVTec-layout data set, for tests and runs without MVTec AD.

Each category is a visibly different texture in its own colours (so that even a random-weight CNN's
global-average feature tells the categories apart, which the routing tests rely on). Normal images
vary by a random phase/offset and pixel noise; each category has two defect types, `scratch` (a
thick polyline) and `blob` (a filled ellipse), painted in a contrasting flat colour exactly where
their mask is 255. Uses only numpy and PIL, and writes byte-identical files for the same arguments.

CLI: ``python -m moleflow.data.synthetic OUT_DIR [--categories ...] [--seed ...] [--image-size ...]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from moleflow.utils.files import atomic_write_text, file_lock

SYNTHETIC_CATEGORIES: tuple[str, ...] = ("stripes", "checker", "dots", "gradient", "noise")
DEFECT_TYPES: tuple[str, ...] = ("scratch", "blob")
MANIFEST_NAME = ".moleflow_synthetic.json"

_GENERATOR_ID = "moleflow.data.synthetic"
_FORMAT_VERSION = 1
_MIN_IMAGE_SIZE = 16
_MIN_DEFECT_FRACTION = 0.03
_PIXEL_NOISE_STD = 3.0
# Seed-sequence codes that keep the random streams of the splits apart.
_SPLIT_TRAIN, _SPLIT_TEST_GOOD, _SPLIT_TEST_DEFECT = 0, 1, 2

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class _Style:
    """Colours of one category: texture from colour_a (t=0) to colour_b (t=1), flat defect colours."""

    colour_a: RGB
    colour_b: RGB
    scratch: RGB
    blob: RGB


_STYLES: dict[str, _Style] = {
    "stripes": _Style(colour_a=(25, 45, 130), colour_b=(110, 160, 235), scratch=(255, 235, 0), blob=(235, 30, 30)),
    "checker": _Style(colour_a=(205, 95, 25), colour_b=(95, 45, 15), scratch=(0, 240, 255), blob=(30, 30, 235)),
    "dots": _Style(colour_a=(40, 140, 60), colour_b=(205, 240, 185), scratch=(255, 0, 255), blob=(235, 30, 30)),
    "gradient": _Style(colour_a=(250, 240, 120), colour_b=(200, 190, 40), scratch=(0, 0, 0), blob=(30, 30, 200)),
    "noise": _Style(colour_a=(110, 20, 120), colour_b=(220, 120, 230), scratch=(0, 255, 0), blob=(255, 255, 0)),
}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) in [0, 1)."""
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    y, x = np.meshgrid(coords, coords, indexing="ij")
    return y, x


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    angle = math.pi / 4 + rng.uniform(-0.15, 0.15)
    freq = 4.0 + rng.uniform(-0.3, 0.3)
    phase = rng.uniform(0.0, 2 * math.pi)
    return 0.5 + 0.5 * np.sin(2 * math.pi * freq * (x * math.cos(angle) + y * math.sin(angle)) + phase)


def _checker(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    cells = 6
    oy, ox = rng.uniform(0.0, 1.0 / cells, size=2)
    return ((np.floor((x + ox) * cells) + np.floor((y + oy) * cells)) % 2).astype(np.float64)


def _dots(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    period = 1.0 / 5
    oy, ox = rng.uniform(0.0, period, size=2)
    dy = (y + oy) % period - period / 2
    dx = (x + ox) % period - period / 2
    return (np.hypot(dy, dx) < 0.3 * period).astype(np.float64)


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    angle = rng.uniform(0.0, math.pi / 2)
    ramp = (x * math.cos(angle) + y * math.sin(angle)) / (math.cos(angle) + math.sin(angle))
    return np.clip(ramp + rng.uniform(-0.1, 0.1), 0.0, 1.0)


def _noise(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.random((6, 6)).astype(np.float32)
    smooth = Image.fromarray(coarse).resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.clip(np.asarray(smooth, dtype=np.float64), 0.0, 1.0)


_TEXTURES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "stripes": _stripes,
    "checker": _checker,
    "dots": _dots,
    "gradient": _gradient,
    "noise": _noise,
}


def _normal_image(category: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A defect-free (size, size, 3) uint8 image of the category."""
    style = _STYLES[category]
    t = _TEXTURES[category](rng, size)[..., None]
    a = np.asarray(style.colour_a, dtype=np.float64)
    b = np.asarray(style.colour_b, dtype=np.float64)
    img = a + t * (b - a) + rng.normal(0.0, _PIXEL_NOISE_STD, size=(size, size, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _defect_mask(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Boolean mask of one drawn defect covering at least 3% of the image."""
    min_pixels = math.ceil(_MIN_DEFECT_FRACTION * size * size)
    if kind == "scratch":
        # A polyline across most of the image; widened until it covers enough pixels.
        n_points = int(rng.integers(3, 5))
        xs = np.linspace(rng.uniform(0.05, 0.2), rng.uniform(0.8, 0.95), n_points) * size
        ys = rng.uniform(0.1, 0.9, size=n_points) * size
        if rng.random() < 0.5:
            xs, ys = ys, xs
        points = [(float(px), float(py)) for px, py in zip(xs, ys, strict=True)]
        width = max(3, round(0.06 * size))
        while True:
            canvas = Image.new("L", (size, size), 0)
            ImageDraw.Draw(canvas).line(points, fill=255, width=width, joint="curve")
            mask = np.asarray(canvas) > 0
            if mask.sum() >= min_pixels:
                return mask
            width += 1
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    ry, rx = rng.uniform(0.12, 0.22, size=2) * size
    while True:
        canvas = Image.new("L", (size, size), 0)
        ImageDraw.Draw(canvas).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        mask = np.asarray(canvas) > 0
        if mask.sum() >= min_pixels:
            return mask
        rx, ry = rx * 1.1, ry * 1.1


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _generate_category(root: Path, category: str, args: dict) -> None:
    size = args["image_size"]
    cat_code = SYNTHETIC_CATEGORIES.index(category)
    seed = args["seed"]
    base = root / category

    def rng(split: int, sub: int, index: int) -> np.random.Generator:
        return np.random.default_rng([seed, cat_code, split, sub, index])

    for i in range(args["num_train"]):
        _save_png(_normal_image(category, rng(_SPLIT_TRAIN, 0, i), size), base / "train" / "good" / f"{i:03d}.png")
    for i in range(args["num_test_good"]):
        img = _normal_image(category, rng(_SPLIT_TEST_GOOD, 0, i), size)
        _save_png(img, base / "test" / "good" / f"{i:03d}.png")
    style = _STYLES[category]
    for d, defect in enumerate(DEFECT_TYPES):
        colour = np.asarray(style.scratch if defect == "scratch" else style.blob, dtype=np.uint8)
        for i in range(args["num_test_defect"]):
            gen = rng(_SPLIT_TEST_DEFECT, d, i)
            img = _normal_image(category, gen, size)
            mask = _defect_mask(defect, gen, size)
            img[mask] = colour
            _save_png(img, base / "test" / defect / f"{i:03d}.png")
            _save_png(mask.astype(np.uint8) * 255, base / "ground_truth" / defect / f"{i:03d}_mask.png")


def _expected_files(root: Path, args: dict) -> list[Path]:
    files: list[Path] = []
    for category in args["categories"]:
        base = root / category
        files += [base / "train" / "good" / f"{i:03d}.png" for i in range(args["num_train"])]
        files += [base / "test" / "good" / f"{i:03d}.png" for i in range(args["num_test_good"])]
        for defect in DEFECT_TYPES:
            for i in range(args["num_test_defect"]):
                files.append(base / "test" / defect / f"{i:03d}.png")
                files.append(base / "ground_truth" / defect / f"{i:03d}_mask.png")
    return files


def _read_manifest(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("generator") != _GENERATOR_ID:
        return None
    return data


def _write_manifest(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _check_args(
    categories: Sequence[str],
    num_train: int,
    num_test_good: int,
    num_test_defect: int,
    image_size: int,
    seed: int,
) -> list[str]:
    if isinstance(categories, str):
        msg = f"categories must be a list of names, got the string {categories!r}; write [{categories!r}]."
        raise TypeError(msg)
    names = list(categories)
    if not names:
        msg = f"categories is empty: choose one or more of {list(SYNTHETIC_CATEGORIES)}."
        raise ValueError(msg)
    unknown = [c for c in names if c not in SYNTHETIC_CATEGORIES]
    if unknown:
        msg = f"Unknown synthetic categories {unknown}: choose from {list(SYNTHETIC_CATEGORIES)}."
        raise ValueError(msg)
    duplicated = sorted({c for c in names if names.count(c) > 1})
    if duplicated:
        msg = f"Categories {duplicated} are listed more than once in {names}: list each once."
        raise ValueError(msg)
    counts = {"num_train": num_train, "num_test_good": num_test_good, "num_test_defect": num_test_defect}
    for name, value in {**counts, "image_size": image_size, "seed": seed}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            msg = f"{name} must be a non-negative int, got {value!r}."
            raise ValueError(msg)
    if num_train < 1:
        msg = "num_train must be at least 1: every category needs normal training images."
        raise ValueError(msg)
    if num_test_good + num_test_defect < 1:
        msg = "num_test_good + num_test_defect must be at least 1: every category needs test images."
        raise ValueError(msg)
    if image_size < _MIN_IMAGE_SIZE:
        msg = f"image_size must be at least {_MIN_IMAGE_SIZE} so that defects are drawable, got {image_size}."
        raise ValueError(msg)
    return names


def generate_synthetic_mvtec(
    root: Path | str,
    categories: Sequence[str] = SYNTHETIC_CATEGORIES[:3],
    num_train: int = 12,
    num_test_good: int = 4,
    num_test_defect: int = 4,
    image_size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a small MVTec-layout tree of generated PNGs with exact ground-truth masks.

    Layout: ROOT/<cat>/train/good/000.png, ROOT/<cat>/test/good/000.png,
    ROOT/<cat>/test/<defect>/000.png and ROOT/<cat>/ground_truth/<defect>/000_mask.png, with the
    defects `scratch` and `blob`. The arguments are recorded in ROOT/.moleflow_synthetic.json; a
    second call with the same arguments returns at once, and a call with different arguments
    replaces the category folders the previous call wrote.

    Args:
        root: Output folder (created if missing).
        categories: Names from SYNTHETIC_CATEGORIES, in task order.
        num_train: Normal training images per category.
        num_test_good: Normal test images per category.
        num_test_defect: Anomalous test images per category AND per defect type.
        image_size: Side of the square images.
        seed: Base seed; each image's generator is seeded from (seed, category, split, defect, index).

    Returns:
        The root folder.

    Raises:
        ValueError: Unknown/duplicated category or invalid count/size.
        FileExistsError: A category folder exists under root that this generator did not write.
    """
    names = _check_args(categories, num_train, num_test_good, num_test_defect, image_size, seed)
    root = Path(root)
    args = {
        "generator": _GENERATOR_ID,
        "version": _FORMAT_VERSION,
        "categories": names,
        "num_train": num_train,
        "num_test_good": num_test_good,
        "num_test_defect": num_test_defect,
        "image_size": image_size,
        "seed": seed,
    }
    if _is_complete(root, args):
        return root
    # Jobs of a parallel multirun may all generate the same tree at once: one writes, the others wait
    # for it and then find it complete. The lock lives beside root (root may not exist yet).
    with file_lock(root.parent / f".{root.name}.generate.lock"):
        if not _is_complete(root, args):
            _generate_tree(root, names, args)
    return root


def generated_root(root: Path | str, categories: Sequence[str], **generate: Any) -> Path:
    """The folder under ``root`` that holds the tree generated with these settings (``data.generate``).

    Each setting gets a folder of its own, named after the settings and a hash of them, so that a run
    generating with other settings never replaces (deletes) a tree that a parallel job is reading.
    """
    names = list(categories)
    settings = {"version": _FORMAT_VERSION, "categories": names, **{k: generate[k] for k in sorted(generate)}}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    size = generate.get("image_size", "default")
    return Path(root) / f"{len(names)}cat_{size}px_seed{generate.get('seed', 0)}_{digest}"


def _is_complete(root: Path, args: dict) -> bool:
    """True when ``root`` holds every file of a finished generation with exactly ``args``."""
    old = _read_manifest(root / MANIFEST_NAME)
    return old == {**args, "complete": True} and all(p.is_file() for p in _expected_files(root, args))


def _generate_tree(root: Path, names: list[str], args: dict) -> None:
    """Write the tree (the caller holds the generation lock): replace what an earlier call wrote."""
    manifest_path = root / MANIFEST_NAME
    old = _read_manifest(manifest_path)
    previous = [c for c in (old or {}).get("categories", []) if c in SYNTHETIC_CATEGORIES]
    for category in names:
        if (root / category).exists() and category not in previous:
            msg = (
                f"{root / category} already exists and was not written by the synthetic generator; "
                "choose an empty output folder or remove it."
            )
            raise FileExistsError(msg)
    for category in previous:
        if (root / category).is_dir():
            shutil.rmtree(root / category)

    root.mkdir(parents=True, exist_ok=True)
    # Recorded before writing, so that an interrupted run is recognised and replaced next time.
    _write_manifest(manifest_path, {**args, "complete": False})
    for category in names:
        _generate_category(root, category, args)
    _write_manifest(manifest_path, {**args, "complete": True})


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; prints the output folder."""
    parser = argparse.ArgumentParser(
        prog="python -m moleflow.data.synthetic",
        description="Write a small generated data set in the MVTec AD layout (for tests and demos).",
    )
    parser.add_argument("out_dir", type=Path, help="output folder (created if missing)")
    parser.add_argument(
        "--categories",
        nargs="+",
        default=list(SYNTHETIC_CATEGORIES[:3]),
        choices=SYNTHETIC_CATEGORIES,
        help="categories to generate, in task order (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=12, help="training images per category")
    parser.add_argument("--num-test-good", type=int, default=4, help="normal test images per category")
    parser.add_argument(
        "--num-test-defect", type=int, default=4, help="anomalous test images per category and defect type"
    )
    ns = parser.parse_args(argv)
    try:
        root = generate_synthetic_mvtec(
            ns.out_dir,
            categories=ns.categories,
            num_train=ns.num_train,
            num_test_good=ns.num_test_good,
            num_test_defect=ns.num_test_defect,
            image_size=ns.image_size,
            seed=ns.seed,
        )
    except (ValueError, FileExistsError) as err:
        parser.error(str(err))
    print(root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
