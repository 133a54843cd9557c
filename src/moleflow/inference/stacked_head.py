"""The routing-and-flow head of an export: every task's parameters stacked, tasks picked per image.

Built from a trained :class:`~moleflow.models.moleflow.MoLEFlowModel`: experts as stacked LoRA factors
(T, r, in) / (T, out, r) or full copies (T, out, in), adapters as (T, D), per-task convolutions as one
grouped convolution. Each image runs through its routed task with gathers and batched matmuls: pure
tensor ops with no branch on values, so the module traces and scripts cleanly. Used by
:mod:`moleflow.inference.export`, which adds the backbone, writes the file and checks parity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moleflow.evaluation.anomaly_map import pixel_anomaly_map
from moleflow.inference.scoring import sanitize_per_image
from moleflow.inference.stacked_layers import (
    ExportError,
    TaskCouplingBlock,
    TaskDepthwiseConv,
    TaskDIABlock,
    pick_task,
    stack_tensors,
)
from moleflow.models.adapters import WhiteningAdapter
from moleflow.models.coupling import CouplingBlock, CouplingFlow
from moleflow.models.dia import DIA, DIABlock
from moleflow.models.experts import FullRankExpert, LoRAExpert, TaskExpertLinear
from moleflow.models.mixer import SpatialContextMixer
from moleflow.models.moleflow import MoLEFlowModel
from moleflow.models.router import PrototypeRouter
from moleflow.models.subnet import MoLESubnet, ScaleContext

_KNOWN_MODULES = (
    MoLEFlowModel,
    nn.ModuleDict,
    nn.ModuleList,
    nn.Sequential,
    nn.ReLU,
    nn.Linear,
    nn.Conv2d,
    PrototypeRouter,
    WhiteningAdapter,
    SpatialContextMixer,
    CouplingFlow,
    CouplingBlock,
    MoLESubnet,
    ScaleContext,
    TaskExpertLinear,
    LoRAExpert,
    FullRankExpert,
    DIA,
    DIABlock,
)


def check_exportable(model: MoLEFlowModel) -> None:
    """Refuse a model with parts the export module does not know, naming them."""
    if getattr(model.router, "kind", "prototype") != "prototype":
        msg = (
            f"Cannot export: the model routes with the {model.router.kind!r} router; the exported module implements "
            "the prototype router only (model.flow.router=prototype). Predict with the Python detector instead."
        )
        raise ExportError(msg)
    unknown = sorted({type(m).__name__ for m in model.modules() if type(m) not in _KNOWN_MODULES})
    if unknown:
        msg = (
            f"Cannot export: the model contains {unknown}, which moleflow.inference.export does not know how to "
            "turn into per-task stacked tensors. Extend ExportableMoLEFlow for them, or predict with the Python "
            "detector instead."
        )
        raise ExportError(msg)
    if model.num_tasks < 1 or model.router.num_tasks < model.num_tasks:
        msg = f"Cannot export a model with {model.num_tasks} task(s) and {model.router.num_tasks} router prototype(s)."
        raise ExportError(msg)


class RoutedFlowHead(nn.Module):
    """Patch features (B, H, W, D) -> routing, per-image flow of the routed task, scores, verdicts."""

    def __init__(
        self,
        model: MoLEFlowModel,
        grid: tuple[int, int],
        image_size: int,
        top_k: int,
        pixel_sigma: float,
        score_thresholds: Sequence[float],
        route_thresholds: Sequence[float],
    ) -> None:
        super().__init__()
        check_exportable(model)
        cfg = model.config
        n = model.num_tasks
        tasks = list(range(n))
        keys = [model._key(t) for t in tasks]  # noqa: SLF001 - which flow/mixer each task uses
        self.grid = grid
        self.dim = cfg.embed_dim
        self.image_size = image_size
        self.top_k = top_k
        self.pixel_sigma = float(pixel_sigma)
        self.log_norm = 0.5 * cfg.embed_dim * math.log(2 * math.pi)
        self.register_buffer("means", model.router.means[:n].detach().clone())
        self.register_buffer("precisions", model.router.precisions[:n].detach().clone())
        self.register_buffer("score_thresholds", torch.tensor(list(score_thresholds), dtype=torch.float64))
        self.register_buffer("route_thresholds", torch.tensor(list(route_thresholds), dtype=torch.float64))
        self.use_positional = bool(cfg.positional_encoding)
        if self.use_positional:
            self.register_buffer("positional", model.positional(grid[0], grid[1], torch.device("cpu")).clone())
        self.use_adapter = all(str(t) in model.adapters for t in tasks)
        if not self.use_adapter and any(str(t) in model.adapters for t in tasks):
            msg = "Some tasks have an input adapter and others do not; the exporter expects all or none."
            raise ExportError(msg)
        if self.use_adapter:
            adapters = [model.adapters[str(t)] for t in tasks]
            self.adapter_eps = float(adapters[0].eps)
            self.register_buffer("gamma", stack_tensors([a.gamma for a in adapters]))
            self.register_buffer("beta", stack_tensors([a.beta for a in adapters]))
        has_mixer = [k in model.mixers for k in keys]
        self.use_mixer = all(has_mixer)
        if not self.use_mixer and any(has_mixer):
            msg = "Some tasks have a spatial context mixer and others do not; the exporter expects all or none."
            raise ExportError(msg)
        self.shared_mixer = self.use_mixer and len(set(keys)) == 1
        if self.use_mixer:
            mixers = [model.mixers[k] for k in keys]
            if self.shared_mixer:
                self.mixer = mixers[0]
            else:
                self.task_mixer = TaskDepthwiseConv([m.conv for m in mixers])
                self.register_buffer("mixer_gates", stack_tensors([torch.sigmoid(m.theta) for m in mixers]))
        flows = [model.flows[k] for k in keys]
        self.blocks = nn.ModuleList(
            TaskCouplingBlock([f.blocks[i] for f in flows], grid) for i in range(len(flows[0].blocks))
        )
        has_dia = [str(t) in model.dia for t in tasks]
        if any(has_dia) and not all(has_dia):
            msg = "Some tasks have DIA blocks and others do not; the exporter expects all or none."
            raise ExportError(msg)
        self.dia = nn.ModuleList()
        if all(has_dia):
            dias = [model.dia[str(t)] for t in tasks]
            self.dia = nn.ModuleList(TaskDIABlock([d.blocks[i] for d in dias]) for i in range(len(dias[0].blocks)))

    def route(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, H, W, D) -> routed tasks (B,), their distances (B,), all distances (B, T) in float64."""
        x = features.mean(dim=(1, 2)).to(torch.float64)
        diff = x[:, None, :] - self.means[None, :, :]
        dists = torch.einsum("btd,tde,bte->bt", diff, self.precisions, diff)
        best, tasks = dists.min(dim=1)
        return tasks, best, dists

    def nll(self, features: Tensor, tasks: Tensor) -> Tensor:
        """Per-patch NLL (B, H, W) of each image under its task ``tasks[b]``."""
        h, w = self.grid
        x = features
        if self.use_positional:
            x = x + self.positional
        if self.use_adapter:
            gamma = pick_task(self.gamma, tasks)[:, None, None, :]
            beta = pick_task(self.beta, tasks)[:, None, None, :]
            x = gamma * F.layer_norm(x, (self.dim,), eps=self.adapter_eps) + beta
        if self.use_mixer:
            if self.shared_mixer:
                x = self.mixer(x)
            else:
                g = pick_task(self.mixer_gates, tasks)[:, None, None, None]
                mixed = self.task_mixer(x.permute(0, 3, 1, 2), tasks).permute(0, 2, 3, 1)
                x = (1 - g) * x + g * mixed
        z = x.reshape(-1, h * w, self.dim)
        logdet = torch.zeros_like(z[..., 0])
        for block in self.blocks:
            z, ld = block(z, tasks)
            logdet = logdet + ld
        if len(self.dia) > 0:  # the Python model sums the DIA log-dets first, then adds them
            dia_logdet = torch.zeros_like(logdet)
            for block in self.dia:
                z, ld = block(z, tasks)
                dia_logdet = dia_logdet + ld
            logdet = logdet + dia_logdet
        nll = 0.5 * z.pow(2).sum(dim=-1) + self.log_norm - logdet
        return nll.reshape(-1, h, w)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        tasks, best, dists = self.route(features)
        nll, replaced = sanitize_per_image(self.nll(features, tasks).float())
        score = torch.topk(nll.flatten(1), self.top_k, dim=1).values.mean(dim=1)
        unknown = (dists > self.route_thresholds[None, :]).all(dim=1)
        threshold = pick_task(self.score_thresholds, tasks)
        defective = (score.to(torch.float64) > threshold) & ~unknown
        return {
            "task": tasks,
            "routing_distance": best,
            "distances": dists,
            "score": score,
            "threshold": threshold,
            "is_unknown": unknown,
            "is_defective": defective,
            "nll_map": nll,
            "anomaly_map": pixel_anomaly_map(nll, self.image_size, self.pixel_sigma),
            "nonfinite": replaced,
        }
