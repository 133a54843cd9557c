"""How a patch NLL map becomes an image score and a pixel map (``model.score.*``): defaults and ranges, once."""

from __future__ import annotations

from dataclasses import dataclass

from moleflow.config.settings import setting


@dataclass
class ScoreConfig:
    """``model.score``: the image score is the mean of the ``top_k`` highest patch NLLs; the pixel map is the
    NLL map upsampled to the image and smoothed with a Gaussian of ``pixel_sigma`` pixels (docs/method.md 7)."""

    top_k: int = setting(3, ">= 1 (and at most the patches per image)", lambda v: v >= 1)
    pixel_sigma: float = setting(4.0, "> 0", lambda v: v > 0)
