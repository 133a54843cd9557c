"""Per-image scoring shared by the Python detector and the exported model, so both compute the same thing.

Evaluation (``moleflow.evaluation``) replaces non-finite patch values over a whole batch at once; for
prediction one image's result must not depend on which images share its batch, so here every image is
cleaned on its own: NaN and +inf become that image's largest finite value (a collapsed patch counts as
maximally anomalous), -inf its smallest, and an image with no finite value at all becomes zeros. For
finite maps (the normal case) this is exactly evaluation's behaviour. Written with tensor ops only
(no Python branches on values), so it traces into the exported model unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moleflow.evaluation.anomaly_map import pixel_anomaly_map


def sanitize_per_image(nll: Tensor) -> tuple[Tensor, Tensor]:
    """nll (B, H, W) -> (clean (B, H, W), count of replaced values per image (B,) int64)."""
    finite = torch.isfinite(nll)
    neg_inf = torch.full_like(nll, float("-inf"))
    pos_inf = torch.full_like(nll, float("inf"))
    hi = torch.where(finite, nll, neg_inf).flatten(1).amax(dim=1)[:, None, None]
    lo = torch.where(finite, nll, pos_inf).flatten(1).amin(dim=1)[:, None, None]
    clean = torch.where(torch.isnan(nll) | (nll == float("inf")), hi.expand_as(nll), nll)
    clean = torch.where(nll == float("-inf"), lo.expand_as(nll), clean)
    any_finite = finite.flatten(1).any(dim=1)[:, None, None]
    clean = torch.where(any_finite, clean, torch.zeros_like(nll))
    replaced = (~finite).flatten(1).sum(dim=1)
    return clean, replaced


def image_scores(nll: Tensor, top_k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Raw NLL maps (B, H, W) -> (clean maps, image scores (B,), replaced counts (B,)).

    The image score is the mean of the ``top_k`` largest patch NLLs, as in training's evaluation.
    """
    clean, replaced = sanitize_per_image(nll.float())
    scores = torch.topk(clean.flatten(1), top_k, dim=1).values.mean(dim=1)
    return clean, scores, replaced


def score_maps(nll: Tensor, top_k: int, image_size: int, sigma: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Raw NLL maps (B, H, W) -> (clean maps, image scores (B,), pixel maps (B, S, S), replaced counts (B,)).

    The pixel map is the bilinear upsampling to S x S followed by Gaussian smoothing (method.md 7).
    """
    clean, scores, replaced = image_scores(nll, top_k)
    return clean, scores, pixel_anomaly_map(clean, image_size, sigma), replaced
