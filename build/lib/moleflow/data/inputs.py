"""Turning what a user hands the detector (files, folders, PIL images, arrays, tensors) into model input.

Every image goes through the training pipeline's reader (:func:`moleflow.data.images.load_rgb` for
files; the same RGB conversion for in-memory images): RGB (grey replicated, alpha dropped, 16-bit
scaled), bilinear resize to S x S, ImageNet mean/std. A tensor is taken as already preprocessed that
way, because that is what the project's data loaders produce.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from moleflow.data.images import _DECODE_ERRORS, IMAGENET_MEAN, IMAGENET_STD, ImageReadError, _to_rgb, load_rgb
from moleflow.data.types import IMAGE_EXTENSIONS
from moleflow.utils.prefetch import map_threads

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)


@dataclass
class LoadedImage:
    """One model input (3, S, S), where it came from, and its original (H, W) (None for tensors)."""

    tensor: torch.Tensor
    source: str
    original_hw: tuple[int, int] | None
    path: Path | None = None


def pil_to_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """PIL image of any mode -> normalised (3, S, S) float32, exactly as ``load_rgb`` does for files."""
    img = ImageOps.exif_transpose(img) or img  # upright, as files are read
    if img.mode == "P":
        img = img.convert("RGBA")
    rgb = _to_rgb(img)
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
    arr = np.asarray(rgb, dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    return (tensor - _MEAN) / _STD


def array_to_pil(arr: np.ndarray) -> Image.Image:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array (uint8, uint16, or float in [0, 1]) -> PIL image.

    Channel order is RGB (an OpenCV image is BGR: pass ``arr[..., ::-1]``).
    """
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        msg = (
            f"A numpy image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) in RGB(A) order, "
            f"got {a.shape}; a channels-first array needs arr.transpose(1, 2, 0)."
        )
        raise ValueError(msg)
    if a.dtype == np.uint8:
        return Image.fromarray(a)
    if a.dtype == np.uint16:
        if a.ndim == 2:
            return Image.fromarray(a)  # mode "I;16": scaled as 16-bit, like a 16-bit PNG file
        return Image.fromarray((a.astype(np.float64) * (255.0 / 65535.0)).round().astype(np.uint8))
    if np.issubdtype(a.dtype, np.floating):
        finite = a[np.isfinite(a)]
        if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
            msg = f"A float image must hold values in [0, 1], got range [{finite.min()}, {finite.max()}]."
            raise ValueError(msg)
        return Image.fromarray((np.nan_to_num(a, nan=0.0) * 255.0).round().astype(np.uint8))
    msg = f"Unsupported numpy image dtype {a.dtype}: use uint8, uint16 or float in [0, 1]."
    raise ValueError(msg)


def to_model_inputs(images: Any, image_size: int) -> list[LoadedImage]:
    """Anything ``MoLEFlowDetector.predict`` accepts -> one LoadedImage per image, in order.

    Files are decoded on a thread pool (:func:`moleflow.utils.prefetch.map_threads`).

    Raises:
        FileNotFoundError, ImageReadError: A file is missing or cannot be decoded.
        ValueError, TypeError: An array or tensor has the wrong shape or type.
    """
    if isinstance(images, torch.Tensor):
        return _tensor_inputs(images, image_size, "tensor")
    if isinstance(images, str | Path | Image.Image | np.ndarray):
        images = [images]
    images = list(images)
    files = [Path(item) for item in images if isinstance(item, str | Path)]
    decoded = iter(map_threads(lambda path: load_rgb(path, image_size), files))  # all cores, in order
    out: list[LoadedImage] = []
    for i, item in enumerate(images):
        if isinstance(item, str | Path):
            tensor, hw = next(decoded)
            out.append(LoadedImage(tensor, str(item), hw, Path(item)))
        elif isinstance(item, Image.Image):
            out.append(LoadedImage(pil_to_tensor(item, image_size), f"<PIL image {i}>", (item.height, item.width)))
        elif isinstance(item, np.ndarray):
            pil = array_to_pil(item)
            out.append(LoadedImage(pil_to_tensor(pil, image_size), f"<array {i}>", (pil.height, pil.width)))
        elif isinstance(item, torch.Tensor):
            out.extend(_tensor_inputs(item, image_size, f"tensor {i}"))
        else:
            msg = (
                f"Image {i} has type {type(item).__name__}; give file paths, PIL images, numpy arrays or a "
                "(B, 3, S, S) tensor normalised like the training data."
            )
            raise TypeError(msg)
    return out


def _tensor_inputs(t: torch.Tensor, image_size: int, name: str) -> list[LoadedImage]:
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[1] != 3 or tuple(t.shape[2:]) != (image_size, image_size):
        msg = (
            f"A tensor input must be (B, 3, {image_size}, {image_size}) (or (3, S, S)): RGB, resized to the "
            f"model's image size and ImageNet-normalised; got {tuple(t.shape)} for {name}. Pass file paths, PIL "
            "images or numpy arrays to have them resized and normalised for you."
        )
        raise ValueError(msg)
    if not t.is_floating_point():
        msg = f"A tensor input must be float (ImageNet-normalised), got {t.dtype} for {name}."
        raise TypeError(msg)
    return [LoadedImage(t[b].float(), f"<{name}[{b}]>", None) for b in range(t.shape[0])]


def try_load(path: Path, image_size: int) -> LoadedImage | str:
    """Load a file, or return why it cannot be read (for folder runs, where a bad file must not stop the run)."""
    try:
        tensor, hw = load_rgb(path, image_size)
    except (ImageReadError, FileNotFoundError, *_DECODE_ERRORS) as err:
        return f"{type(err).__name__}: {err}"
    return LoadedImage(tensor, str(path), hw, path)


@dataclass
class InputScan:
    """What a folder search found: image files to read, and everything passed over with the reason."""

    files: list[Path]
    skipped: list[dict[str, str]]  # {"file": path, "reason": why it was not read}


def scan_images(root: Path | str, exclude: Sequence[Path | str] = ()) -> list[Path]:
    """Image files under ``root`` (a file or a folder, searched recursively); see :func:`scan_inputs`."""
    return scan_inputs(root, exclude).files


def scan_inputs(root: Path | str, exclude: Sequence[Path | str] = ()) -> InputScan:
    """Image files under ``root`` (a file or a folder, searched recursively, symlinks followed), sorted.

    A file is taken by its extension (``IMAGE_EXTENSIONS``, case-insensitive); whether it decodes is
    found out when it is read. Nothing is passed over quietly: hidden files and folders, files with
    other extensions, broken symlinks, folders in ``exclude`` (e.g. the run's own output folder) and
    folders reached a second time through a symlink (a loop, or two links to one folder) are listed in
    ``skipped`` with the reason.
    """
    root = Path(root).expanduser()
    if not root.exists():
        what = "is a broken symlink" if root.is_symlink() else "does not exist"
        msg = f"Input {root} {what}; give an image file or a folder of images (searched recursively)."
        raise FileNotFoundError(msg)
    if root.is_file():
        return InputScan([root], [])
    excluded = [Path(e).resolve() for e in exclude]
    found: list[Path] = []
    skipped: list[dict[str, str]] = []
    visited: dict[Path, Path] = {}  # real folder -> the path it was first reached by
    pending = [root]
    links: list[Path] = []  # symlinked folders, searched after every real one (a real path is named first)
    while pending or links:
        folder = pending.pop() if pending else links.pop(0)
        real = folder.resolve()
        if real in visited:
            reason = f"symlinked folder already searched as {visited[real]} (a loop, or two links to one folder)"
            skipped.append({"file": str(folder), "reason": reason})
            continue
        if any(real == e or e in real.parents for e in excluded):
            skipped.append({"file": str(folder), "reason": "the run's own output folder"})
            continue
        visited[real] = folder
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as err:
            skipped.append({"file": str(folder), "reason": f"folder cannot be listed: {err.strerror or err}"})
            continue
        for path in entries:
            reason = _skip_reason(path)
            if reason is not None:
                skipped.append({"file": str(path), "reason": reason})
            elif path.is_dir():
                (links if path.is_symlink() else pending).append(path)
            else:
                found.append(path)
    return InputScan(sorted(found), sorted(skipped, key=lambda item: item["file"]))


def _skip_reason(path: Path) -> str | None:
    """Why ``path`` (an entry of a searched folder) is not read, or None for an image file or a folder."""
    if path.name.startswith("."):
        return "hidden (name starts with '.')"
    if path.is_symlink() and not path.exists():
        return f"broken symlink to {os.readlink(path)}"
    if path.is_dir():
        return None
    if not path.is_file():
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file extension ({path.suffix or 'none'}; read: {', '.join(sorted(IMAGE_EXTENSIONS))})"
    return None
