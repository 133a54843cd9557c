"""Anomaly-map overlay PNGs for predictions: the image, and the heat map over it with the predicted defect mask's
outline, the verdict on top.

Same look as the training run's figures (``evaluation/plots.py``: image, then "jet" heat map at 50 %
over it), but drawn with PIL instead of a matplotlib figure, because a folder of thousands of images
needs one PNG each and a figure per image costs ten times as long.

Colour scale per image: from the map's minimum to ``max(map maximum, score threshold)``, so a normal
image (whose map stays below the threshold) looks cool and only a map that reaches the threshold turns
fully red.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.nn import functional as F

from moleflow.data.images import _to_rgb, to_pixels
from moleflow.inference.masks import mask_at_original, outline
from moleflow.inference.prediction import Prediction

DISPLAY_MAX_SIDE = 512  # overlays are for looking at: larger originals are shown downscaled
DISPLAY_MIN_SIDE = 256  # and small ones upscaled, so the caption and the map stay legible
CAPTION_HEIGHT = 36
FONT_SIZE = 12
HEAT_ALPHA = 0.5  # as in evaluation/plots.py
OUTLINE_COLOUR = (255, 255, 255)  # the predicted defect mask's outline, over the heat map


def _display_image(path: Path | None, tensor: torch.Tensor) -> Image.Image:
    """The original file (scaled into DISPLAY_MIN_SIDE..DISPLAY_MAX_SIDE), or the de-normalised model input."""
    rgb = None
    if path is not None:
        try:
            with Image.open(path) as img:
                img.load()
                rgb = _to_rgb(img if img.mode != "P" else img.convert("RGBA")).copy()
        except (OSError, ValueError):  # readable once, unreadable now: show what the model saw
            rgb = None
    if rgb is None:
        rgb = _denormalise(tensor)
    rgb.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.BILINEAR)
    return _at_least(rgb)


def _at_least(img: Image.Image) -> Image.Image:
    if max(img.size) >= DISPLAY_MIN_SIDE:
        return img
    scale = DISPLAY_MIN_SIDE / max(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)


def _denormalise(tensor: torch.Tensor) -> Image.Image:
    arr = (to_pixels(tensor).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def _heat(anomaly_map: torch.Tensor, size: tuple[int, int], vmax_floor: float | None) -> Image.Image:
    """(S, S) map -> RGB heat image of ``size`` (W, H)."""
    w, h = size
    up = F.interpolate(anomaly_map[None, None].float(), size=(h, w), mode="bilinear", align_corners=True)[0, 0]
    vmin = float(up.min())
    vmax = float(up.max())
    if vmax_floor is not None and math.isfinite(vmax_floor):
        vmax = max(vmax, vmax_floor)
    norm = ((up - vmin) / (vmax - vmin)).clamp(0, 1) if vmax > vmin else torch.zeros_like(up)
    rgba = matplotlib.colormaps["jet"](norm.numpy())
    return Image.fromarray((rgba[..., :3] * 255).round().astype(np.uint8))


def _caption(pred: Prediction) -> list[str]:
    route = "none" if pred.route_threshold is None else f"{pred.route_threshold:.4g}"
    task = f"nearest task {pred.task}" if pred.is_unknown else f"task {pred.task}"
    first = f"{pred.verdict.upper()}   {task}   routing distance {pred.routing_distance:.4g} (limit {route})"
    thr = "none" if pred.threshold is None else f"{pred.threshold:.4g}"
    normalised = "" if pred.normalized_score is None else f" ({pred.normalized_score:.2f} normalised, 0.5 = threshold)"
    second = f"score {pred.score:.4g}{normalised}   threshold {thr}"
    if pred.is_unknown:
        second += "   (against the nearest task)"
    return [first, second]


def save_overlay(pred: Prediction, tensor: torch.Tensor, path: Path | None, out: Path) -> Path:
    """Write the overlay PNG of one prediction to ``out``; returns ``out``."""
    image = _display_image(path, tensor)
    heat = _heat(pred.anomaly_map, image.size, pred.threshold)
    blended = Image.blend(image, heat, HEAT_ALPHA)
    if pred.defect_mask is not None and bool(pred.defect_mask.any()):  # where the defect is: its outline
        edge = outline(mask_at_original(pred.defect_mask, (image.height, image.width)))
        pixels = np.asarray(blended).copy()
        pixels[edge] = OUTLINE_COLOUR
        blended = Image.fromarray(pixels)
    w, h = image.size
    font = ImageFont.load_default(size=FONT_SIZE)
    lines = _caption(pred)
    text_width = max(math.ceil(font.getlength(line)) for line in lines) + 8
    canvas = Image.new("RGB", (max(2 * w, text_width), h + CAPTION_HEIGHT), "white")
    canvas.paste(image, (0, CAPTION_HEIGHT))
    canvas.paste(blended, (w, CAPTION_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    colour = {"normal": (0, 110, 0), "defective": (190, 0, 0)}.get(pred.verdict, (150, 90, 0))
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * (FONT_SIZE + 4)), line, fill=colour if i == 0 else (0, 0, 0), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
