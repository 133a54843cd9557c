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


class ExportError(RuntimeError):
    """The model cannot be exported (unknown part, unsupported format) or the export failed its parity check."""


def _stack(tensors: Sequence[Tensor]) -> Tensor:
    return torch.stack([t.detach().clone() for t in tensors])


def _pick(tensor: Tensor, tasks: Tensor) -> Tensor:
    """Row ``tasks[b]`` of a per-task stack, for every image b."""
    return tensor.index_select(0, tasks)


class TaskLinear(nn.Module):
    """Linear layer whose weights depend on each image's task: x (B, P, in) -> (B, P, out).

    Built from the layer each task uses (``layers[t]``): one shared base or per-task bases, plus
    LoRA factors (kept low rank), full-rank copies, or nothing.
    """

    def __init__(self, layers: Sequence[nn.Module]) -> None:
        super().__init__()
        first = layers[0]
        tasks = range(len(layers))
        self.full = False
        self.lora = False
        self.shared_base = False
        self.scale = 1.0
        if isinstance(first, nn.Linear):  # plain per-task linears (DIA)
            self.full = True
            self.register_buffer("weight", _stack([m.weight for m in layers]))
            self.register_buffer("bias", _stack([m.bias for m in layers]))
            return
        if not isinstance(first, TaskExpertLinear):
            msg = f"TaskLinear cannot export a {type(first).__name__}."
            raise ExportError(msg)
        if first.mode == "full":
            self.full = True
            merged = [m.merged_weight(t) for t, m in zip(tasks, layers, strict=True)]
            self.register_buffer("weight", _stack([w for w, _ in merged]))
            self.register_buffer("bias", _stack([b for _, b in merged]))
            return
        self.shared_base = all(m is first for m in layers)
        if self.shared_base:
            self.register_buffer("weight", first.base.weight.detach().clone())
            self.register_buffer("bias", first.base.bias.detach().clone())
        else:
            self.register_buffer("weight", _stack([m.base.weight for m in layers]))
            self.register_buffer("bias", _stack([m.base.bias for m in layers]))
        if first.mode == "lora":
            self.lora = True
            self.scale = float(first.alpha) / float(first.rank)
            out_f, in_f = first.base.out_features, first.base.in_features
            a, b, c = [], [], []
            for t, m in zip(tasks, layers, strict=True):
                expert = m.experts[str(t)] if str(t) in m.experts else None
                if expert is None:  # no expert: the task computes the base, i.e. a zero update
                    a.append(torch.zeros(m.rank, in_f))
                    b.append(torch.zeros(out_f, m.rank))
                    c.append(torch.zeros(out_f))
                else:
                    if not math.isclose(expert.scale, self.scale):
                        msg = f"LoRA experts of one layer have different scales ({expert.scale} vs {self.scale})."
                        raise ExportError(msg)
                    a.append(expert.A)
                    b.append(expert.B)
                    c.append(expert.bias)
            self.register_buffer("lora_a", _stack(a))  # (T, r, in)
            self.register_buffer("lora_b", _stack(b))  # (T, out, r)
            self.register_buffer("lora_bias", _stack(c))  # (T, out)

    def forward(self, x: Tensor, tasks: Tensor) -> Tensor:
        if self.full or not self.shared_base:
            y = torch.bmm(x, _pick(self.weight, tasks).transpose(1, 2)) + _pick(self.bias, tasks)[:, None, :]
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora:
            low = torch.bmm(x, _pick(self.lora_a, tasks).transpose(1, 2))
            low = torch.bmm(low, _pick(self.lora_b, tasks).transpose(1, 2))
            y = y + (low * self.scale + _pick(self.lora_bias, tasks)[:, None, :])
        return y


class TaskDepthwiseConv(nn.Module):
    """Per-task depthwise convolutions as one grouped convolution over all tasks, then a gather.

    x (B, C, H, W) -> (B, C, H, W) with image b filtered by task ``tasks[b]``'s kernel. The grouped
    convolution computes every task's output (depthwise convolutions are cheap); the number of groups
    is C, not B * C, so the batch size stays free in the exported graph.
    """

    def __init__(self, convs: Sequence[nn.Conv2d]) -> None:
        super().__init__()
        c = convs[0].in_channels
        self.channels = c
        self.num_tasks = len(convs)
        self.padding = convs[0].padding
        w = torch.stack([m.weight.detach() for m in convs], dim=1)  # (C, T, 1, k, k)
        b = torch.stack([m.bias.detach() for m in convs], dim=1)  # (C, T)
        self.register_buffer("weight", w.reshape(c * self.num_tasks, *w.shape[2:]).clone())
        self.register_buffer("bias", b.reshape(-1).clone())

    def forward(self, x: Tensor, tasks: Tensor) -> Tensor:
        out = F.conv2d(x, self.weight, self.bias, padding=self.padding, groups=self.channels)
        out = out.unflatten(1, (self.channels, self.num_tasks))  # (B, C, T, H, W)
        index = tasks.view(-1, 1, 1, 1, 1).expand(-1, self.channels, 1, out.shape[3], out.shape[4])
        return out.gather(2, index).squeeze(2)


class TaskScaleContext(nn.Module):
    """The subnet's scale context alpha * DWConv(u1 on its grid), shared or per task. u1 (B, P, C1)."""

    def __init__(self, contexts: Sequence[ScaleContext], grid: tuple[int, int]) -> None:
        super().__init__()
        self.grid = grid
        self.shared = all(c is contexts[0] for c in contexts)
        if self.shared:
            self.conv = contexts[0].conv
            self.register_buffer("alpha", contexts[0].alpha.detach().clone())
        else:
            self.task_conv = TaskDepthwiseConv([c.conv for c in contexts])
            self.register_buffer("alphas", _stack([c.alpha for c in contexts]))

    def forward(self, u1: Tensor, tasks: Tensor) -> Tensor:
        h, w = self.grid
        maps = u1.reshape(-1, h, w, u1.shape[-1]).permute(0, 3, 1, 2)
        if self.shared:
            ctx = self.conv(maps)
            alpha = self.alpha
        else:
            ctx = self.task_conv(maps, tasks)
            alpha = _pick(self.alphas, tasks)[:, None, None]
        ctx = ctx.permute(0, 2, 3, 1).reshape(u1.shape)
        return alpha * ctx


class TaskSubnet(nn.Module):
    """MoLE subnet (s-branch with scale context + t-branch, or the joint MLP) with per-image experts."""

    def __init__(self, subnets: Sequence[MoLESubnet], grid: tuple[int, int]) -> None:
        super().__init__()
        first = subnets[0]
        self.joint = first.scale_context is None
        if self.joint:
            self.l1 = TaskLinear([s.l1 for s in subnets])
            self.l2 = TaskLinear([s.l2 for s in subnets])
        else:
            self.context = TaskScaleContext([s.scale_context for s in subnets], grid)
            self.s1 = TaskLinear([s.s1 for s in subnets])
            self.s2 = TaskLinear([s.s2 for s in subnets])
            self.t1 = TaskLinear([s.t1 for s in subnets])
            self.t2 = TaskLinear([s.t2 for s in subnets])

    def forward(self, u1: Tensor, tasks: Tensor) -> Tensor:
        if self.joint:
            return self.l2(F.relu(self.l1(u1, tasks)), tasks)
        ctx = self.context(u1, tasks)
        s_raw = self.s2(F.relu(self.s1(torch.cat([u1, ctx], dim=-1), tasks)), tasks)
        t_raw = self.t2(F.relu(self.t1(u1, tasks)), tasks)
        return torch.cat([s_raw, t_raw], dim=-1)


class TaskCouplingBlock(nn.Module):
    """One coupling block (u2' = u2 * exp(s) + t, then the fixed permutation) with per-image experts."""

    def __init__(self, blocks: Sequence[CouplingBlock], grid: tuple[int, int]) -> None:
        super().__init__()
        first = blocks[0]
        for b in blocks[1:]:
            same = torch.equal(b.perm, first.perm) and b.clamp == first.clamp and b.subnet_scale == first.subnet_scale
            if not same:
                msg = "Per-task flows differ in permutation, clamp or subnet scale; the exporter assumes they match."
                raise ExportError(msg)
        self.c1, self.c2 = first.c1, first.c2
        self.clamp = float(first.clamp)
        self.subnet_scale = float(first.subnet_scale)
        self.subnet = TaskSubnet([b.subnet for b in blocks], grid)
        self.register_buffer("perm", first.perm.detach().clone())

    def forward(self, x: Tensor, tasks: Tensor) -> tuple[Tensor, Tensor]:
        u1, u2 = x[..., : self.c1], x[..., self.c1 :]
        a = self.subnet_scale * self.subnet(u1, tasks)
        s = self.clamp * torch.tanh(a[..., : self.c2])
        t = a[..., self.c2 :]
        y = torch.cat([u1, u2 * torch.exp(s) + t], dim=-1)
        return y.index_select(-1, self.perm), s.sum(dim=-1)


class TaskDIABlock(nn.Module):
    """One DIA coupling block of every task, applied per image."""

    def __init__(self, blocks: Sequence[DIABlock]) -> None:
        super().__init__()
        first = blocks[0]
        self.half = first.half
        self.odd = first.odd
        self.clamp = float(first.clamp)
        self.s = nn.ModuleList(TaskLinear([b.S[i] for b in blocks]) for i in (0, 2, 4))
        self.t = nn.ModuleList(TaskLinear([b.T[i] for b in blocks]) for i in (0, 2, 4))

    @staticmethod
    def _mlp(layers: nn.ModuleList, x: Tensor, tasks: Tensor) -> Tensor:
        n = len(layers)
        for i, layer in enumerate(layers):
            x = layer(x, tasks)
            if i < n - 1:
                x = F.relu(x)
        return x

    def forward(self, x: Tensor, tasks: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x[..., : self.half], x[..., self.half :]
        cond, trans = (b, a) if self.odd else (a, b)
        s = self.clamp * torch.tanh(self._mlp(self.s, cond, tasks) / self.clamp)
        new = trans * torch.exp(s) + self._mlp(self.t, cond, tasks)
        y = torch.cat([new, cond] if self.odd else [cond, new], dim=-1)
        return y, s.sum(dim=-1)


def check_exportable(model: MoLEFlowModel) -> None:
    """Refuse a model with parts the export module does not know, naming them."""
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
            self.register_buffer("gamma", _stack([a.gamma for a in adapters]))
            self.register_buffer("beta", _stack([a.beta for a in adapters]))
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
                self.register_buffer("mixer_gates", _stack([torch.sigmoid(m.theta) for m in mixers]))
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
            gamma = _pick(self.gamma, tasks)[:, None, None, :]
            beta = _pick(self.beta, tasks)[:, None, None, :]
            x = gamma * F.layer_norm(x, (self.dim,), eps=self.adapter_eps) + beta
        if self.use_mixer:
            if self.shared_mixer:
                x = self.mixer(x)
            else:
                g = _pick(self.mixer_gates, tasks)[:, None, None, None]
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
        threshold = _pick(self.score_thresholds, tasks)
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
