"""Anomaly scores and maps: top-k mean, mirror-padded blur equal to scipy, upsampling, sanitising."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from moleflow.evaluation import (
    gaussian_blur2d,
    gaussian_kernel1d,
    image_scores_topk,
    pixel_anomaly_map,
    sanitize_nonfinite,
)


@pytest.mark.parametrize("k", [1, 3, 15, 28 * 28])
def test_topk_mean_matches_manual_sort(k: int) -> None:
    nll = 300 + 50 * torch.randn(4, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = torch.stack([torch.sort(m.reshape(-1), descending=True).values[:k].mean() for m in nll])
    torch.testing.assert_close(image_scores_topk(nll, k), expected)


@pytest.mark.parametrize("k", [0, -1, 17])
def test_topk_bounds(k: int) -> None:
    with pytest.raises(ValueError, match="score_top_k"):
        image_scores_topk(torch.zeros(2, 4, 4), k)


def test_topk_needs_3d() -> None:
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        image_scores_topk(torch.zeros(16), 3)


def test_gaussian_kernel() -> None:
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 2 * int(4.0 * 4.0 + 0.5) + 1
    assert float(kernel.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(kernel, kernel.flip(0))
    with pytest.raises(ValueError, match="sigma"):
        gaussian_kernel1d(0.0)


@pytest.mark.parametrize(
    ("height", "width", "sigma"),
    [(56, 40, 4.0), (224, 224, 4.0), (9, 13, 1.3), (5, 7, 4.0), (1, 6, 2.0), (2, 3, 0.5)],
)
def test_blur_matches_scipy_mirror(height: int, width: int, sigma: float) -> None:
    """Includes images smaller than the kernel radius (16 px for sigma 4): still exact."""
    x = torch.rand(3, height, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = gaussian_filter(x.numpy(), sigma=(0, sigma, sigma), mode="mirror", truncate=4.0)
    np.testing.assert_allclose(gaussian_blur2d(x, sigma).numpy(), expected, atol=1e-5, rtol=0)
    out32 = gaussian_blur2d(x.float(), sigma)
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32.numpy(), expected, atol=1e-5, rtol=0)


def test_blur_nll_scale_float32() -> None:
    x = 300 + 50 * torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = gaussian_filter(x.double().numpy(), sigma=(0, 4.0, 4.0), mode="mirror")
    np.testing.assert_allclose(gaussian_blur2d(x, 4.0).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("sigma", [0.0, -1.0])
def test_blur_disabled(sigma: float) -> None:
    x = torch.rand(2, 5, 5)
    assert torch.equal(gaussian_blur2d(x, sigma), x)


def test_pixel_map_corners_and_shape() -> None:
    nll = 300 + 50 * torch.randn(2, 28, 28, generator=torch.Generator().manual_seed(3))
    up = pixel_anomaly_map(nll, 224, sigma=0.0)
    assert up.shape == (2, 224, 224)
    for r, c in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        torch.testing.assert_close(up[:, r, c], nll[:, r, c])
    rect = pixel_anomaly_map(nll, (100, 60))
    assert rect.shape == (2, 100, 60)
    blurred = pixel_anomaly_map(nll, 224)
    torch.testing.assert_close(blurred, gaussian_blur2d(up, 4.0))


def test_pixel_map_bad_input() -> None:
    with pytest.raises(ValueError, match="out_size"):
        pixel_anomaly_map(torch.zeros(1, 4, 4), 0)
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        pixel_anomaly_map(torch.zeros(4, 4), 8)


def test_sanitize_replaces_and_counts() -> None:
    x = torch.tensor([[1.0, math.nan, 5.0], [math.inf, -math.inf, -2.0]])
    original = x.clone()
    clean, n = sanitize_nonfinite(x)
    assert n == 3
    torch.testing.assert_close(clean, torch.tensor([[1.0, 5.0, 5.0], [5.0, -2.0, -2.0]]))
    torch.testing.assert_close(x, original, equal_nan=True)  # input untouched


def test_sanitize_edge_cases() -> None:
    finite = torch.arange(6.0).reshape(2, 3)
    clean, n = sanitize_nonfinite(finite)
    assert n == 0 and torch.equal(clean, finite)
    all_bad = torch.tensor([math.nan, math.inf, -math.inf])
    clean, n = sanitize_nonfinite(all_bad)
    assert n == 3 and torch.equal(clean, torch.zeros(3))
    ints = torch.arange(4)
    assert sanitize_nonfinite(ints) == (ints, 0)


def test_per_image_sanitising_uses_each_image_alone() -> None:
    from moleflow.evaluation import sanitize_nonfinite_per_image

    x = torch.tensor([[[1.0, math.nan], [3.0, -math.inf]], [[9.0, 8.0], [math.inf, 7.0]], [[math.nan] * 2] * 2])
    clean, replaced = sanitize_nonfinite_per_image(x)
    expected = torch.tensor([[[1.0, 3.0], [3.0, 1.0]], [[9.0, 8.0], [9.0, 7.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert torch.equal(clean, expected) and replaced.tolist() == [2, 1, 4]
    alone, _ = sanitize_nonfinite_per_image(x[:1])
    assert torch.equal(alone, clean[:1])  # image 0 does not see image 1's larger values


class _StubRouter:
    def route(self, features: torch.Tensor, num_seen: int) -> tuple[torch.Tensor, torch.Tensor]:
        tasks = (features[:, 0] > 0).long() % num_seen  # some images misrouted
        return tasks, features[:, 1].double().abs()


class _StubModel:
    """Patch NLLs from the features, NaN/inf wherever a feature is extreme (as a diverged expert gives)."""

    router = _StubRouter()

    def eval(self) -> _StubModel:
        return self

    def nll_routed(self, features: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        nll = 100 + 10 * features[..., 0] + tasks[:, None, None]
        nll = torch.where(features[..., 1] > 1.8, torch.full_like(nll, math.nan), nll)
        return torch.where(features[..., 2] > 2.2, torch.full_like(nll, math.inf), nll)


def test_evaluation_does_not_depend_on_the_batch_size() -> None:
    """Non-finite patches are replaced image by image and maps blurred per image: any batch size, same bits."""
    from moleflow.evaluation.evaluate import EvaluationSpec, evaluate_task
    from moleflow.models.feature_extractor import FeatureSet

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(11, 6, 6, 4, generator=gen)
    masks = torch.zeros(11, 24, 24, dtype=torch.uint8)
    masks[1::2, 4:12, 6:14] = 1
    labels = torch.tensor([0, 1] * 5 + [0])
    test = FeatureSet(features, features.mean(dim=(1, 2)), labels, masks)
    runs = [
        evaluate_task(_StubModel(), test, 1, "t", 2, EvaluationSpec(3, 2.0, 24, batch), torch.device("cpu"))
        for batch in (1, 3, 11)
    ]
    assert runs[0].nonfinite_oracle > 0 and runs[0].nonfinite_routed > 0
    for other in runs[1:]:
        for field in ("oracle_nll", "routed_nll", "oracle_image_scores", "routed_image_scores", "routed_pixel_maps"):
            assert torch.equal(getattr(runs[0], field), getattr(other, field)), field
        assert runs[0].routed.as_dict() == other.routed.as_dict()
        assert (runs[0].nonfinite_oracle, runs[0].nonfinite_routed) == (other.nonfinite_oracle, other.nonfinite_routed)
