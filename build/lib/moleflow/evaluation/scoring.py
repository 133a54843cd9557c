"""Per-image scoring shared by the Python detector and the exported model, so both compute the same thing.

One image's result must not depend on which images share its batch, so every image is cleaned on its
own (:func:`moleflow.evaluation.anomaly_map.sanitize_nonfinite_per_image`, the rule evaluation uses too):
NaN and +inf become that image's largest finite value (a collapsed patch counts as maximally anomalous),
-inf its smallest, and an image with no finite value at all becomes zeros. Written with tensor ops only
(no Python branches on values), so it traces into the exported model unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moleflow.evaluation.anomaly_map import pixel_anomaly_map, sanitize_nonfinite_per_image


def sanitize_per_image(nll: Tensor) -> tuple[Tensor, Tensor]:
    """nll (B, H, W) -> (clean (B, H, W), count of replaced values per image (B,) int64)."""
    return sanitize_nonfinite_per_image(nll)


def image_scores(nll: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Raw NLL maps (B, H, W) -> (clean maps, image scores (B,), replaced counts (B,)).

    The image score is the mean of the ``top_k`` largest patch NLLs, as in training's evaluation.
    """
    clean, replaced = sanitize_per_image(nll.float())
    scores = torch.topk(clean.flatten(1), top_k, dim=1).values.mean(dim=1)
    return clean, scores, replaced


def score_maps(nll: Tensor, top_k: int, image_size: int, sigma: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw NLL maps (B, H, W) -> (clean maps, image scores (B,), pixel maps (B, S, S), replaced counts (B,)).

    The pixel map is the bilinear upsampling to S x S followed by Gaussian smoothing (docs/method.md 7).
    """
    clean, scores, replaced = image_scores(nll, top_k)
    return clean, scores, pixel_anomaly_map(clean, image_size, sigma), replaced
