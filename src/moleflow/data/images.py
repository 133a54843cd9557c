"""Reading images and masks into normalised tensors, with errors that name the offending file.

Every image becomes 3-channel RGB (grey replicated), resized to S x S and normalised with the
ImageNet mean/std that the frozen backbone was trained with. Images and masks are turned upright by
their EXIF orientation first (as every viewer shows them), so a mask drawn on the displayed image lines
up. CMYK, palette, alpha and 1-bit images are converted by PIL. Integer grey images are scaled to 8 bits
by their real bit depth (see :func:`bit_depth`); a mode PIL cannot convert is an error naming the file.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from moleflow.data.types import DatasetLayoutError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1)

# Errors PIL raises for truncated, corrupt or non-image files (UnidentifiedImageError is an OSError;
# some decoders raise SyntaxError, EOFError, ValueError or struct.error on broken data).
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, EOFError, ValueError, struct.error)
_LOSSY_SUFFIXES = frozenset({".jpg", ".jpeg"})


def from_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """(3, S, S) pixel values in 0..1 -> the ImageNet-normalised tensor the backbone reads."""
    return (pixels - _MEAN) / _STD


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """(3, S, S) ImageNet-normalised tensor -> pixel values (0..1 for a loaded image; not clipped)."""
    return image.cpu() * _STD + _MEAN


class ImageReadError(ValueError):
    """An image or mask file exists but cannot be decoded (truncated, corrupt or not an image)."""


def _check_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0:
        msg = f"image_size must be a positive int (e.g. 224), got {image_size!r}."
        raise ValueError(msg)


EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the image by 90 degrees
TIFF_BITS_PER_SAMPLE = 258


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as shown, i.e. after the EXIF orientation, read from the header only (cheap)."""
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS:  # a damaged EXIF block: the pixels are still what they are
        orientation = 1
    return (img.height, img.width) if orientation in _SWAPS_SIDES else (img.width, img.height)


def _open_fully(path: Path, kind: str) -> Image.Image:
    """Open and fully decode a file, upright by its EXIF orientation, so truncation is detected here."""
    if not path.is_file():
        what = f"is a broken symlink to {path.readlink()}" if path.is_symlink() else "not found"
        msg = f"{kind} file {what}: {path}. Check the data-set folder or re-scan it."
        raise FileNotFoundError(msg)
    try:
        with Image.open(path) as img:
            img.load()
            declared = _declared_bits(img)
            upright = ImageOps.exif_transpose(img) or img
            out = upright.copy() if upright.mode != "P" else upright.convert("RGBA")
            out.info["moleflow_bits"] = declared
            return out
    except _DECODE_ERRORS as err:
        msg = (
            f"Cannot read {kind.lower()} {path}: {type(err).__name__}: {err}. The file is truncated, "
            "corrupt or not an image; re-extract the data set or remove this file."
        )
        raise ImageReadError(msg) from err


def _declared_bits(img: Image.Image) -> int | None:
    """Bits per sample a file declares for a grey image (TIFF tag 258), if any."""
    tags = getattr(img, "tag_v2", None)
    if tags is None or TIFF_BITS_PER_SAMPLE not in tags:
        return None
    value = tags[TIFF_BITS_PER_SAMPLE]
    value = value[0] if isinstance(value, tuple) else value
    return int(value) if isinstance(value, int) else None


def bit_depth(img: Image.Image, values: np.ndarray) -> int:
    """The real bit depth of an integer grey image, by which it is scaled to 8 bits.

    16-bit containers (16-bit PNG or TIFF, ``I;16*``, uint16 arrays) are 16-bit: a dark 16-bit image stays
    dark. A 32-bit integer image (``I``: 32-bit TIFFs, some converters' output) says nothing about its data,
    so it takes the depth the file declares when that is 8 or 16 bits, else the smallest of 8, 16 and 32
    bits that holds its values: 8-bit data stored as ``I`` stays 8-bit instead of being divided by 257.
    """
    if img.mode.startswith("I;16"):
        return 16
    declared = img.info.get("moleflow_bits")
    if declared in (8, 16):
        return int(declared)
    top = float(values.max(initial=0))
    return 8 if top <= 255 else 16 if top <= 65535 else 32


def _high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    """Scale an integer (``I``, ``I;16*``) or float (``F``) grey image to 0..255 by its bit depth, not by clipping."""
    arr = np.asarray(img)
    if arr.ndim != 2:
        arr = arr.reshape(img.height, img.width)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64))
        scale = 255.0 if float(arr.max(initial=0.0)) <= 1.0 else 1.0  # [0, 1] floats, else 0..255 values
    else:
        scale = 255.0 / float(2 ** bit_depth(img, arr) - 1)
        arr = arr.astype(np.float64)
    out = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("F", "I") or img.mode.startswith("I;16"):
        img = _high_bit_depth_to_8bit(img)
    return img.convert("RGB")


def _converted(convert: Callable[[Image.Image], Any], img: Image.Image, path: Path, kind: str) -> Any:
    """``convert(img)``, with PIL's conversion errors turned into one that names the file and its mode."""
    try:
        return convert(img)
    except (ValueError, OSError, TypeError) as err:
        msg = (
            f"Cannot convert {kind.lower()} {path} (PIL mode {img.mode!r}) to {'RGB' if kind == 'Image' else 'grey'}: "
            f"{err}. Save it as 8-bit RGB or grey (e.g. PNG) and try again."
        )
        raise ImageReadError(msg) from err


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
    rgb = _converted(_to_rgb, img, path, "Image")
    if rgb.size != (image_size, image_size):
        rgb = rgb.resize((image_size, image_size), resample=Image.Resampling.BILINEAR)
    arr = np.asarray(rgb, dtype=np.uint8)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)
    return from_pixels(tensor), original_hw


def _mask_values(img: Image.Image) -> np.ndarray:
    """Per-pixel mask intensity: the grey value, or the largest colour channel (alpha ignored)."""
    if img.mode == "1":
        return np.asarray(img.convert("L"))
    if img.mode in ("L", "F", "I") or img.mode.startswith("I;16"):
        arr = np.asarray(img)
        return arr.reshape(img.height, img.width) if arr.ndim != 2 else arr
    if img.mode in ("LA", "La"):
        return np.asarray(img)[..., 0]
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
    binary = (_converted(_mask_values, img, path, "Mask") > threshold).astype(np.uint8) * 255
    resized = Image.fromarray(binary)
    if resized.size != (image_size, image_size):
        resized = resized.resize((image_size, image_size), resample=Image.Resampling.NEAREST)
    arr = (np.asarray(resized) > 0).astype(np.float32)
    return torch.from_numpy(arr).unsqueeze(0)


def mask_marks_pixels(image: Path, mask: Path) -> bool:
    """Whether an existing mask marks any pixel; a mask that cannot be read, or is not of its image's size, is a
    layout error (read at scan time, so that a broken clone fails before training rather than at test time)."""
    try:
        with Image.open(image) as img, Image.open(mask) as msk:
            image_size, mask_size = img.size, msk.size
            marked = bool(np.asarray(msk).any())
    except _DECODE_ERRORS as err:
        msg = f"Cannot read mask {mask} (or its image {image}): {type(err).__name__}: {err}. Re-clone the data set."
        raise DatasetLayoutError(msg) from err
    if image_size != mask_size:
        msg = (
            f"Mask {mask} is {mask_size[0]}x{mask_size[1]} px but its image {image} is "
            f"{image_size[0]}x{image_size[1]} px: a mask must have its image's size. Re-clone the data set."
        )
        raise DatasetLayoutError(msg)
    return marked
