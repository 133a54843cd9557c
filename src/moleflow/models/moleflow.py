"""The MoLE-Flow model on patch features: adapters, mixer, coupling flow with task experts, DIA, router.

A plain ``nn.Module`` (no Lightning, no Hydra). Per patch, for active task t (docs/method.md 3):
x = [standardise F with t's statistics, if enabled] + P -> input adapter of t -> spatial context mixer
-> coupling flow (shared base + t's experts) -> DIA blocks of t -> z, with per-patch log-determinant.

Shapes: F (B, H, W, D) patch features; z (B, H, W, D); log-det and NLL maps (B, H, W).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from moleflow.config.flow import MoLEFlowConfig
from moleflow.models.adapters import WhiteningAdapter
from moleflow.models.coupling import CouplingFlow
from moleflow.models.dia import DIA
from moleflow.models.experts import TaskExpertLinear
from moleflow.models.mixer import SpatialContextMixer
from moleflow.models.positional import positional_encoding_2d
from moleflow.models.router import build_router
from moleflow.models.standardizer import TaskStandardizer

SHARED_KEY = "shared"  # ModuleDict key of the flow / mixer used by every task


class MoLEFlowModel(nn.Module):
    """Continual normalizing flow over patch features with per-task experts and a prototype router."""

    def __init__(self, config: MoLEFlowConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        d = config.embed_dim
        self.standardizers = nn.ModuleDict()
        self.adapters = nn.ModuleDict()
        self.mixers = nn.ModuleDict()
        self.flows = nn.ModuleDict()
        self.dia = nn.ModuleDict()
        self.router = build_router(
            config.router,
            d,
            ridge=config.router_ridge,
            grid=config.router_grid,
            keep=config.router_keep,
            variance_floor=config.router_variance_floor,
            global_vote=config.router_global_vote,
            neighbors=config.router_neighbors,
        )
        self.num_tasks = 0
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        if config.base_sharing != "separate":
            self._build_shared_parts(SHARED_KEY)

    # ----------------------------------------------------------------------------------- structure
    def _build_shared_parts(self, key: str) -> None:
        c = self.config
        if c.spatial_context_kernel > 0:
            self.mixers[key] = SpatialContextMixer(c.embed_dim, c.spatial_context_kernel, c.mixer_gate_init)
        self.flows[key] = CouplingFlow(
            c.ncl,
            c.embed_dim,
            permutation_seed=c.permutation_seed,
            hidden=c.hidden,
            clamp=c.clamp,
            subnet_scale=c.subnet_scale,
            scale_context_kernel=c.scale_context_kernel,
            expert_mode=c.expert_mode,
            rank=c.lora_rank,
            lora_alpha=c.lora_alpha,
        )

    def _key(self, task: int) -> str:
        return str(task) if self.config.base_sharing == "separate" else SHARED_KEY

    def add_task(self) -> int:
        """Create the next task's adapter, experts and DIA (and its own flow when separated); returns its id.

        Everything created starts so that earlier tasks' outputs are untouched.
        """
        c = self.config
        task = self.num_tasks
        key = str(task)
        if c.base_sharing == "separate":
            self._build_shared_parts(key)
        if c.standardize != "none":
            self.standardizers[key] = TaskStandardizer(
                c.embed_dim, c.standardize, floor=c.standardize_floor, floor_noise=c.standardize_floor_noise
            )
        if c.adapter == "whitening":
            fresh = task == 0 or c.base_sharing == "separate"  # a separated task starts like task 0
            gate = c.adapter_gate_init_first if fresh else c.adapter_gate_init_later
            self.adapters[key] = WhiteningAdapter(c.embed_dim, gate_init=gate)
        self.flows[self._key(task)].add_expert(task)
        if c.dia_blocks > 0:
            self.dia[key] = DIA(c.embed_dim, c.dia_blocks, clamp=c.dia_clamp)
        self.num_tasks += 1
        self.to(self.router.train_counts.device)
        return task

    @staticmethod
    def parameter_owner(name: str) -> int | None:
        """Task id that owns a parameter (by its name), or None for parameters shared by all tasks."""
        parts = name.split(".")
        if "experts" in parts:
            return int(parts[parts.index("experts") + 1])
        if parts[0] in ("standardizers", "adapters", "dia", "flows", "mixers") and parts[1].isdigit():
            return int(parts[1])
        return None

    def fit_task_statistics(self, task: int, features: torch.Tensor) -> None:
        """Fit ``task``'s feature standardisation on its training features (N, H, W, D); no-op without one."""
        self._check_task(task)
        if str(task) in self.standardizers:
            self.standardizers[str(task)].fit(features)

    def set_trainable(self, task: int) -> list[str]:
        """Set requires_grad for training ``task`` (docs/method.md 3.4 table); returns the trainable names.

        Shared parts (base linears, scale contexts, mixer) train in task 0 only, or on every task
        with ``base_sharing="sequential"``; a task's own parts train only during that task.
        """
        train_shared = task == 0 or self.config.base_sharing == "sequential"
        names = []
        for name, p in self.named_parameters():
            owner = self.parameter_owner(name)
            p.requires_grad_(train_shared if owner is None else owner == task)
            if p.requires_grad:
                names.append(name)
        return names

    def parameter_counts(self) -> dict[str, Any]:
        """Parameter counts: total, shared, and per task (experts + adapter + DIA + own flow)."""
        per_task = [0] * self.num_tasks
        shared = 0
        for name, p in self.named_parameters():
            owner = self.parameter_owner(name)
            if owner is None:
                shared += p.numel()
            else:
                per_task[owner] += p.numel()
        return {"total": shared + sum(per_task), "shared": shared, "per_task": per_task}

    # ------------------------------------------------------------------------------------- forward
    def positional(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = (height, width)
        if key not in self._pos_cache:
            self._pos_cache[key] = positional_encoding_2d(height, width, self.config.embed_dim)
        return self._pos_cache[key].to(device)

    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            msg = f"Task {task} does not exist: the model has {self.num_tasks} task(s); call add_task() first."
            raise IndexError(msg)

    def forward(self, features: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, H, W, D) -> z (B, H, W, D), log-det (B, H, W), all patches through ``task``."""
        self._check_task(task)
        b, h, w, d = features.shape
        x = features
        if str(task) in self.standardizers:
            x = self.standardizers[str(task)](x)
        if self.config.positional_encoding:
            x = x + self.positional(h, w, x.device)
        if str(task) in self.adapters:
            x = self.adapters[str(task)](x)
        key = self._key(task)
        if key in self.mixers:
            x = self.mixers[key](x)
        z, logdet = self.flows[key](x.reshape(b * h * w, d), task, (b, h, w))
        if str(task) in self.dia:
            z, ld = self.dia[str(task)](z)
            logdet = logdet + ld
        return z.reshape(b, h, w, d), logdet.reshape(b, h, w)

    def nll(self, features: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch negative log-likelihood (B, H, W) (not divided by D) and the log-det (B, H, W)."""
        z, logdet = self(features, task)
        d = z.shape[-1]
        nll = 0.5 * z.pow(2).sum(dim=-1) + 0.5 * d * math.log(2 * math.pi) - logdet
        return nll, logdet

    @torch.no_grad()
    def nll_routed(self, features: torch.Tensor, tasks: torch.Tensor, every_task: bool = False) -> torch.Tensor:
        """NLL maps (B, H, W) with image b scored by expert ``tasks[b]``.

        Default: one pass per distinct task of the batch. ``every_task=True``: one pass per task of the
        model, each over that task's images only (possibly none), written with tensor ops alone, so that
        no Python branch depends on the values of ``tasks``: the same layers then trace (TorchScript) and
        ``torch.export`` (this is how :mod:`moleflow.inference.export` exports them). Same values.
        """
        if every_task:
            out = features.new_zeros(features.shape[:3])
            for task in range(self.num_tasks):
                idx = (tasks == task).nonzero()[:, 0]
                out = out.index_copy(0, idx, self.nll(features.index_select(0, idx), task)[0])
            return out
        distinct = torch.unique(tasks).tolist()
        if len(distinct) == 1:  # the usual batch (one category): no gather and scatter copies of the features
            return self.nll(features, int(distinct[0]))[0]
        out = features.new_empty(features.shape[:3])
        for task in distinct:
            idx = (tasks == task).nonzero(as_tuple=True)[0].to(features.device)
            out[idx] = self.nll(features[idx], int(task))[0]
        return out

    @contextmanager
    def merged_experts(self, enabled: bool = True) -> Iterator[None]:
        """Inference with every task's expert folded into its base weights (W + (alpha / r) B A).

        One matmul per linear instead of three: the same function up to float rounding (tested). Only
        for frozen weights: the merged copies are taken once per task and dropped on exit.
        """
        layers = [m for m in self.modules() if isinstance(m, TaskExpertLinear)]
        if not enabled:
            yield
            return
        for layer in layers:
            layer.merged = {}
        try:
            yield
        finally:
            for layer in layers:
                layer.merged = None

    def inverse(self, z: torch.Tensor, task: int) -> torch.Tensor:
        """Inverse of the flow part (after the mixer): z (B, H, W, D) -> mixer output (B, H, W, D)."""
        self._check_task(task)
        b, h, w, d = z.shape
        y = z.reshape(b * h * w, d)
        if str(task) in self.dia:
            y = self.dia[str(task)].inverse(y)
        return self.flows[self._key(task)].inverse(y, task, (b, h, w)).reshape(b, h, w, d)

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)
