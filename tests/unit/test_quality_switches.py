"""The quality switches: each changes the model or its features, leaves MAIN unchanged, and keeps zero forgetting."""

from __future__ import annotations

import pytest
import torch

from moleflow.config.flow import MoLEFlowConfig
from moleflow.models.feature_extractor import FeatureExtractor
from moleflow.models.moleflow import MoLEFlowModel
from moleflow.models.standardizer import TaskStandardizer

SMALL = {"embed_dim": 16, "hidden": 16, "ncl": 2, "lora_rank": 4}


def _features(seed: int, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 3.0 + 2.0 * torch.randn(n, 5, 5, 16, generator=g)


@pytest.mark.parametrize("mode", ["channel", "position"])
def test_standardizer_statistics_equal_torch(mode: str) -> None:
    x = _features(0, n=150)  # more than one accumulation chunk
    s = TaskStandardizer(16, mode)
    s.fit(x)
    dims = (0,) if mode == "position" else (0, 1, 2)
    expected_mean = x.double().mean(dim=dims)
    expected_std = x.double().std(dim=dims)
    assert torch.allclose(s.mean.double(), expected_mean, atol=1e-5)
    assert torch.allclose(s.std.double(), expected_std + s.eps, atol=1e-5)
    y = s(x)
    assert torch.allclose(y.mean(dim=dims), torch.zeros(()), atol=1e-4)


def test_standardizer_refuses_unfitted_use_and_a_different_grid() -> None:
    s = TaskStandardizer(16, "position")
    with pytest.raises(RuntimeError, match="never fitted"):
        s(_features(0))
    s.fit(_features(0))
    with pytest.raises(ValueError, match=r"fitted on a \(5, 5\) grid"):
        s(torch.zeros(1, 4, 4, 16))


def test_standardizer_state_survives_a_state_dict_round_trip() -> None:
    a = MoLEFlowModel(MoLEFlowConfig(**SMALL, standardize="position"))
    a.add_task()
    a.fit_task_statistics(0, _features(1))
    b = MoLEFlowModel(MoLEFlowConfig(**SMALL, standardize="position"))
    b.add_task()
    b.load_state_dict(a.state_dict())
    x = _features(2, n=2)
    assert torch.equal(a.nll(x, 0)[0], b.nll(x, 0)[0])


@pytest.mark.parametrize("mode", ["channel", "position"])
def test_standardize_changes_the_model_and_main_has_none(mode: str) -> None:
    assert MoLEFlowConfig().standardize == "none"
    torch.manual_seed(0)
    plain = MoLEFlowModel(MoLEFlowConfig(**SMALL))
    torch.manual_seed(0)
    switched = MoLEFlowModel(MoLEFlowConfig(**SMALL, standardize=mode))
    for m in (plain, switched):
        m.add_task()
        m.fit_task_statistics(0, _features(3))
    assert not plain.standardizers and len(switched.standardizers) == 1
    x = _features(4, n=2)
    assert not torch.allclose(plain.nll(x, 0)[0], switched.nll(x, 0)[0])


def test_a_later_task_leaves_earlier_standardized_scores_bit_identical() -> None:
    model = MoLEFlowModel(MoLEFlowConfig(**SMALL, standardize="position"))
    model.add_task()
    model.fit_task_statistics(0, _features(5))
    x = _features(6, n=3)
    before = model.nll(x, 0)[0].clone()
    model.add_task()
    model.fit_task_statistics(1, 10.0 * _features(7))
    model.set_trainable(1)
    assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("standardizers")] == []
    assert torch.equal(model.nll(x, 0)[0], before)


def test_pool_concat_embedding_keeps_every_channel() -> None:
    common = {"name": "resnet10t", "layers": ["layer2", "layer3"], "pretrained": False}
    with pytest.raises(ValueError, match=r"pool_concat gives D = 128 \+ 256 = 384.*embed_dim=384"):
        FeatureExtractor(**common, embed_dim=32, embedding="pool_concat")
    concat = FeatureExtractor(**common, embed_dim=384, embedding="pool_concat")
    bins = FeatureExtractor(**common, embed_dim=32)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    f = concat(images)
    assert f.shape == (2, 8, 8, 384) and bins(images).shape == (2, 8, 8, 32)
    with torch.no_grad():
        layer2, _ = concat.backbone(images)
    pooled = torch.nn.functional.avg_pool2d(layer2, 3, stride=1, padding=1)
    assert torch.allclose(f[..., :128], pooled.permute(0, 2, 3, 1), atol=1e-6)


def _dark_border(seed: int, n: int, noise: float = 1e-4) -> torch.Tensor:
    """Features whose border cells are the same near-constant value in every image (a black background),
    with structure in the centre: (n, 5, 5, 16)."""
    g = torch.Generator().manual_seed(seed)
    x = 3.0 + 2.0 * torch.randn(n, 5, 5, 16, generator=g)
    border = torch.ones(5, 5, dtype=torch.bool)
    border[1:4, 1:4] = False
    x[:, border] = 0.5 + noise * torch.randn(n, int(border.sum()), 16, generator=g)
    return x


def test_spread_floor_keeps_a_constant_region_finite_and_bounded() -> None:
    train = _dark_border(0, 40)
    test = _dark_border(1, 4, noise=1e-2)  # the same background with a bit more sensor noise
    plain, floored = TaskStandardizer(16, "position"), TaskStandardizer(16, "position", floor=0.3)
    plain.fit(train)
    floored.fit(train)
    border = torch.ones(5, 5, dtype=torch.bool)
    border[1:4, 1:4] = False
    z_plain, z_floor = plain(test)[:, border].abs(), floored(test)[:, border].abs()
    assert z_plain.max() > 50  # noise over a near-zero spread: a "defect" everywhere on the background
    assert torch.isfinite(z_floor).all() and z_floor.max() < 1.0  # bounded by noise / (floor * channel spread)
    centre = ~border  # positions that vary keep (nearly) their own statistics
    assert torch.allclose(floored.std[centre], plain.std[centre], rtol=0.1)
    channel = train.reshape(-1, 16).double().std(dim=0)
    assert torch.all(floored.std[border] >= 0.3 * channel.float() * 0.999)
    x = torch.zeros(1, 5, 5, 16)  # an all-black image: finite everywhere
    assert torch.isfinite(floored(x)).all()


def test_spread_floor_changes_the_model_keeps_forgetting_zero_and_needs_position() -> None:
    assert MoLEFlowConfig().standardize_floor == 0.0
    torch.manual_seed(0)
    plain = MoLEFlowModel(MoLEFlowConfig(**SMALL, standardize="position"))
    torch.manual_seed(0)
    floored = MoLEFlowModel(MoLEFlowConfig(**SMALL, standardize="position", standardize_floor=0.3))
    for m in (plain, floored):
        m.add_task()
        m.fit_task_statistics(0, _dark_border(2, 12))
    x = _dark_border(3, 2, noise=1e-2)
    assert not torch.allclose(plain.nll(x, 0)[0], floored.nll(x, 0)[0])
    before = floored.nll(x, 0)[0].clone()
    floored.add_task()
    floored.fit_task_statistics(1, 5.0 * _dark_border(4, 12))
    assert torch.equal(floored.nll(x, 0)[0], before)  # an earlier task's statistics never change
    with pytest.raises(ValueError, match="needs model.flow.standardize=position"):
        MoLEFlowModel(MoLEFlowConfig(**SMALL, standardize="channel", standardize_floor=0.3))


def test_floor_noise_gives_constant_positions_unit_spread_in_training_only() -> None:
    """standardize_floor_noise: training features jittered by the floor's size; scoring deterministic."""
    train = _dark_border(0, 400)
    floored = TaskStandardizer(16, "position", floor=0.3)
    noisy = TaskStandardizer(16, "position", floor=0.3, floor_noise=True)
    floored.fit(train)
    noisy.fit(train)
    assert torch.equal(noisy.std, floored.std) and torch.equal(noisy.mean, floored.mean)
    border = torch.ones(5, 5, dtype=torch.bool)
    border[1:4, 1:4] = False
    torch.manual_seed(123)  # not 0: _dark_border draws its data from seed 0
    noisy.train()
    z_train = noisy(train)
    assert floored(train)[:, border].std(dim=0).max() < 0.05  # the floor alone: one point per position
    spread = z_train.std(dim=0)  # (H, W, D): every position, border and centre, near unit spread
    assert (spread - 1).abs().mean() < 0.05 and (spread - 1).abs().max() < 0.3
    noisy.eval()
    assert torch.equal(noisy(train), floored(train))  # no noise when scoring
    with pytest.raises(ValueError, match="needs a spread floor"):
        TaskStandardizer(16, "position", floor_noise=True)


def test_floor_noise_changes_training_keeps_forgetting_zero_and_needs_a_floor() -> None:
    assert MoLEFlowConfig().standardize_floor_noise is False
    models = []
    for noise in (False, True):
        torch.manual_seed(0)
        m = MoLEFlowModel(
            MoLEFlowConfig(**SMALL, standardize="position", standardize_floor=0.3, standardize_floor_noise=noise)
        )
        m.add_task()
        m.fit_task_statistics(0, _dark_border(2, 12))
        models.append(m)
    x = _dark_border(3, 2, noise=1e-2)
    plain, noisy = models
    assert torch.equal(plain.eval().nll(x, 0)[0], noisy.eval().nll(x, 0)[0])  # the same model when scoring
    torch.manual_seed(1)
    train_plain = plain.train().nll(x, 0)[0]
    torch.manual_seed(1)
    train_noisy = noisy.train().nll(x, 0)[0]
    assert not torch.allclose(train_plain, train_noisy)  # what the flow is trained on differs
    noisy.eval()
    before = noisy.nll(x, 0)[0].clone()
    noisy.add_task()
    noisy.fit_task_statistics(1, 5.0 * _dark_border(4, 12))
    noisy.train()
    noisy.nll(_dark_border(5, 4), 1)  # a training pass of the new task draws noise
    assert torch.equal(noisy.eval().nll(x, 0)[0], before)  # earlier task's scores bit-identical
    with pytest.raises(ValueError, match="standardize_floor_noise=true trains with noise"):
        MoLEFlowModel(MoLEFlowConfig(**SMALL, standardize="position", standardize_floor_noise=True))
