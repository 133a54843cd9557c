"""Frozen backbone features: shapes, neighbourhood order, weights loading and its errors."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.nn import functional as F

from moleflow.models import feature_extractor as fe
from moleflow.models.feature_extractor import BackboneLoadError, FeatureExtractor, neighbourhood_embedding


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    torch.manual_seed(0)
    return FeatureExtractor("resnet10t", ("layer2", "layer3"), embed_dim=32, pretrained=False)


def test_feature_shape_and_grid(extractor: FeatureExtractor) -> None:
    feats = extractor(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 8, 8, 32)
    assert extractor.grid_size(64) == (8, 8)
    assert extractor.channels == [128, 256]


def test_backbone_is_frozen_and_stays_in_eval(extractor: FeatureExtractor) -> None:
    extractor.train()
    assert not extractor.training and not extractor.backbone.training
    assert all(not p.requires_grad for p in extractor.parameters())


def test_neighbourhood_vector_is_channel_major_and_pooled() -> None:
    fmap = torch.randn(1, 4, 5, 5)
    emb = neighbourhood_embedding(fmap, kernel=3, dim=6)  # 4 * 9 = 36 values -> 6 means of 6
    padded = F.pad(fmap, (1, 1, 1, 1))
    y, x = 2, 3
    vector = padded[0, :, y : y + 3, x : x + 3].reshape(-1)  # (c, kh, kw) order
    assert torch.allclose(emb[0, :, y, x], vector.reshape(6, 6).mean(dim=1), atol=1e-6)


def test_pooling_before_resize_equals_resize_before_pooling() -> None:
    fmap = torch.randn(2, 8, 4, 4)
    pooled_then_resized = F.interpolate(neighbourhood_embedding(fmap, 3, 12), size=(8, 8), mode="bilinear")
    unfolded = F.unfold(fmap, 3, padding=1).reshape(2, 72, 4, 4)
    resized = F.interpolate(unfolded, size=(8, 8), mode="bilinear")
    resized_then_pooled = F.adaptive_avg_pool1d(resized.permute(0, 2, 3, 1).reshape(-1, 1, 72), 12)
    expected = resized_then_pooled.reshape(2, 8, 8, 12).permute(0, 3, 1, 2)
    assert torch.allclose(pooled_then_resized, expected, atol=1e-5)


def test_local_weights_file_is_loaded(tmp_path) -> None:
    torch.manual_seed(1)
    source = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t_weights.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    loaded = FeatureExtractor("resnet10t", ("layer2",), embed_dim=16, weights=str(path))
    reference = timm.create_model("resnet10t", pretrained=False, features_only=True, out_indices=[2])
    reference.load_state_dict(source.state_dict(), strict=False)
    reference.eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(loaded.backbone(x)[0], reference(x)[0], atol=1e-5)


def test_missing_weights_file_names_the_path(tmp_path) -> None:
    with pytest.raises(BackboneLoadError, match="does_not_exist.pth"):
        FeatureExtractor("resnet10t", ("layer2",), embed_dim=16, weights=str(tmp_path / "does_not_exist.pth"))


def test_offline_pretrained_error_names_both_options(monkeypatch) -> None:
    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:
            raise ConnectionError("no network")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(fe.timm, "create_model", offline_create)
    with pytest.raises(BackboneLoadError) as err:
        FeatureExtractor("resnet10t", ("layer2",), embed_dim=16, pretrained=True)
    assert "model.backbone.weights" in str(err.value) and "online" in str(err.value)


def test_unknown_backbone_and_layer_are_named() -> None:
    with pytest.raises(BackboneLoadError, match="no_such_net"):
        FeatureExtractor("no_such_net", ("layer2",), embed_dim=16, pretrained=False)
    with pytest.raises(ValueError, match="layer9"):
        FeatureExtractor("resnet10t", ("layer9",), embed_dim=16, pretrained=False)


def _unfold_and_pool(fmap: torch.Tensor, kernel: int, dim: int) -> torch.Tensor:
    """docs/method.md 2 written out: unfold k x k (channel-major), adaptive average pool of each vector to dim."""
    b, c, h, w = fmap.shape
    patches = F.unfold(fmap, kernel, padding=kernel // 2).transpose(1, 2).reshape(b * h * w, 1, c * kernel**2)
    return F.adaptive_avg_pool1d(patches, dim).reshape(b, h, w, dim).permute(0, 3, 1, 2)


@pytest.mark.parametrize(("channels", "dim"), [(8, 12), (512, 768), (1024, 768), (6, 27), (40, 128)])
def test_grouped_conv_pooling_equals_unfold_and_pool(channels: int, dim: int) -> None:
    """The fast grouped-conv embedding (equal bins) and the unfold fallback (unequal bins) both follow the method."""
    from moleflow.models.feature_extractor import _pooling_conv

    grouped = _pooling_conv(channels, 3, dim) is not None
    assert grouped == ((channels * 9) % dim == 0)  # equal bins: 40 * 9 = 360 values do not split into 128
    fmap = torch.randn(2, channels, 5, 4)
    assert torch.allclose(neighbourhood_embedding(fmap, 3, dim), _unfold_and_pool(fmap, 3, dim), atol=1e-5)
