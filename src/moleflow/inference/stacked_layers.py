"""Per-task stacked layers of an export: every task's parameters stacked, the task picked per image.

Each layer is built from the trained per-task modules (LoRA factors as (T, r, in) / (T, out, r), full
copies as (T, out, in), per-task convolutions as one grouped convolution) and runs every image through
its routed task with gathers and batched matmuls: no branch on values, so it traces and scripts.
:mod:`moleflow.inference.stacked_head` assembles them into the routed flow head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moleflow.models.coupling import CouplingBlock
from moleflow.models.dia import DIABlock
from moleflow.models.experts import TaskExpertLinear
from moleflow.models.subnet import MoLESubnet, ScaleContext


class ExportError(RuntimeError):
    """The model cannot be exported (unknown part, unsupported format) or the export failed its parity check."""


def stack_tensors(tensors: Sequence[Tensor]) -> Tensor:
    """Detached copies of one tensor per task, stacked on a new leading task axis: (T, ...)."""
    return torch.stack([t.detach().clone() for t in tensors])


def pick_task(tensor: Tensor, tasks: Tensor) -> Tensor:
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
            self.register_buffer("weight", stack_tensors([m.weight for m in layers]))
            self.register_buffer("bias", stack_tensors([m.bias for m in layers]))
            return
        if not isinstance(first, TaskExpertLinear):
            msg = f"TaskLinear cannot export a {type(first).__name__}."
            raise ExportError(msg)
        if first.mode == "full":
            self.full = True
            merged = [m.merged_weight(t) for t, m in zip(tasks, layers, strict=True)]
            self.register_buffer("weight", stack_tensors([w for w, _ in merged]))
            self.register_buffer("bias", stack_tensors([b for _, b in merged]))
            return
        self.shared_base = all(m is first for m in layers)
        if self.shared_base:
            self.register_buffer("weight", first.base.weight.detach().clone())
            self.register_buffer("bias", first.base.bias.detach().clone())
        else:
            self.register_buffer("weight", stack_tensors([m.base.weight for m in layers]))
            self.register_buffer("bias", stack_tensors([m.base.bias for m in layers]))
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
            self.register_buffer("lora_a", stack_tensors(a))  # (T, r, in)
            self.register_buffer("lora_b", stack_tensors(b))  # (T, out, r)
            self.register_buffer("lora_bias", stack_tensors(c))  # (T, out)

    def forward(self, x: Tensor, tasks: Tensor) -> Tensor:
        if self.full or not self.shared_base:
            y = torch.bmm(x, pick_task(self.weight, tasks).transpose(1, 2)) + pick_task(self.bias, tasks)[:, None, :]
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora:
            low = torch.bmm(x, pick_task(self.lora_a, tasks).transpose(1, 2))
            low = torch.bmm(low, pick_task(self.lora_b, tasks).transpose(1, 2))
            y = y + (low * self.scale + pick_task(self.lora_bias, tasks)[:, None, :])
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
            self.register_buffer("alphas", stack_tensors([c.alpha for c in contexts]))

    def forward(self, u1: Tensor, tasks: Tensor) -> Tensor:
        h, w = self.grid
        maps = u1.reshape(-1, h, w, u1.shape[-1]).permute(0, 3, 1, 2)
        if self.shared:
            ctx = self.conv(maps)
            alpha = self.alpha
        else:
            ctx = self.task_conv(maps, tasks)
            alpha = pick_task(self.alphas, tasks)[:, None, None]
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
