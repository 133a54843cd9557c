"""Reading images and masks into normalised tensors, with errors that name the offending file.

Every image becomes 3-channel RGB (grey replicated), resized to S x S and normalised with the
ImageNet mean/std that the frozen backbone was trained with.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)

# Errors PIL raises for truncated, corrupt or non-image files (UnidentifiedImageError is an OSError;
# some decoders raise SyntaxError, EOFError, ValueError or struct.error on broken data).
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, EOFError, ValueError, struct.error)
_LOSSY_SUFFIXES = frozenset({".jpg", ".jpeg"})


class ImageReadError(ValueError):
    """An image or mask file exists but cannot be decoded (truncated, corrupt or not an image)."""


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        msg = f"image_size must be a positive int (e.g. 224), got {image_size!r}."
        raise ValueError(msg)


def _open_fully(path: Path, kind: str) -> Image.Image:
    """Open and fully decode a file so that truncation is detected here, not later in a worker."""
    if not path.is_file():
        msg = f"{kind} file not found: {path}. Check the data-set folder or re-scan it."
        raise FileNotFoundError(msg)
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy() if img.mode != "P" else img.convert("RGBA")
    except _DECODE_ERRORS as err:
        msg = (
            f"Cannot read {kind.lower()} {path}: {type(err).__name__}: {err}. The file is truncated, "
            "corrupt or not an image; re-extract the data set or remove this file."
        )
        raise ImageReadError(msg) from err


def _high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float grey image to 0..255 by its bit depth (not by clipping)."""
    arr = np.asarray(img)
    if arr.ndim != 2:
        arr = arr.reshape(img.height, img.width)
    arr = arr.astype(np.float64)
    if img.mode == "F":
        scale = 255.0 if float(arr.max(initial=0.0)) <= 1.0 else 1.0
    elif img.mode.startswith("I;16") or float(arr.max(initial=0.0)) <= 65535.0:
        # 16-bit data; PIL opens 16-bit grey PNGs as "I;16" or (older versions) as "I".
        scale = 255.0 / 65535.0
    else:
        scale = 255.0 / float(np.iinfo(np.int32).max)
    out = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("F", "I") or img.mode.startswith("I;16"):
        img = _high_bit_depth_to_8bit(img)
    return img.convert("RGB")


def load_rgb(path: Path | str, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Read an image as a normalised RGB tensor.

    Args:
        path: Image file (any format PIL reads; grey, alpha, palette and 16-bit are converted).
        image_size: Side S of the square output.

    Returns:
        A (3, S, S) float32 tensor normalised with the ImageNet mean/std, and the original (H, W),
        which is used to check that the mask belongs to the image.

    Raises:
        FileNotFoundError: The file does not exist.
        ImageReadError: The file cannot be decoded.
    """
    _check_size(image_size)
    path = Path(path)
    img = _open_fully(path, "Image")
    original_hw = (img.height, img.width)
    rgb = _to_rgb(img)
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
    arr = np.asarray(rgb, dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    return (tensor - _MEAN) / _STD, original_hw


def _mask_values(img: Image.Image) -> np.ndarray:
    """Per-pixel mask intensity: the grey value, or the largest colour channel (alpha ignored)."""
    if img.mode == "1":
        return np.asarray(img.convert("L"))
    if img.mode in ("L", "F", "I") or img.mode.startswith("I;16"):
        arr = np.asarray(img)
        return arr.reshape(img.height, img.width) if arr.ndim != 2 else arr
    return np.asarray(img.convert("RGB")).max(axis=-1)


def load_mask(
    path: Path | str,
    image_size: int,
    expected_hw: tuple[int, int] | None,
    image_path: Path | str | None = None,
    threshold: float | None = None,
) -> torch.Tensor:
    """Read a ground-truth mask as a binary tensor aligned with its resized image.

    The mask is binarised before a nearest-neighbour resize so that it stays exactly 0/1. Lossless
    masks count every non-zero pixel as anomalous; JPEG masks use a threshold of 127 because
    compression noise would otherwise turn the halo around the defect into anomaly.

    Args:
        path: Mask file.
        image_size: Side S of the square output.
        expected_hw: (H, W) of the image the mask belongs to; None skips the check.
        image_path: The image, named in the size-mismatch error.
        threshold: Mask values above it are anomalous; None: 127 for JPEG masks, else any non-zero
            value (class-index masks keep every class). Data sets with anti-aliased masks set 127.

    Returns:
        A (1, S, S) float32 tensor with values in {0, 1}.

    Raises:
        FileNotFoundError: The file does not exist.
        ImageReadError: The file cannot be decoded.
        ValueError: The mask's size differs from expected_hw.
    """
    _check_size(image_size)
    path = Path(path)
    img = _open_fully(path, "Mask")
    mask_hw = (img.height, img.width)
    if expected_hw is not None and mask_hw != tuple(expected_hw):
        image_name = str(image_path) if image_path is not None else "its image"
        msg = (
            f"Mask {path} has size (H, W) = {mask_hw} but image {image_name} has size "
            f"{tuple(expected_hw)}. A mask must have its image's size; replace the mask or the image."
        )
        raise ValueError(msg)
    if threshold is None:
        threshold = 127 if path.suffix.lower() in _LOSSY_SUFFIXES else 0
    binary = (_mask_values(img) > threshold).astype(np.uint8) * 255
    resized = Image.fromarray(binary)
    if resized.size != (image_size, image_size):
        resized = resized.resize((image_size, image_size), resample=Image.Resampling.NEAREST)
    arr = (np.asarray(resized) > 0).astype(np.float32)
    return torch.from_numpy(arr).unsqueeze(0)
