"""The flow head's settings (``model.flow.*``): every default, type and range once, and the choices they take.

A plain dataclass with no Hydra or Lightning in sight, so the models build from it in any Python program;
the config schema (:mod:`moleflow.config.schema`) registers it for ``model.flow``, and the up-front config
check and :meth:`MoLEFlowConfig.validate` both read its declared ranges.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from moleflow.config.settings import range_problems, setting

EXPERT_MODES: tuple[str, ...] = ("lora", "full", "none")  # per-task experts: low-rank, full-rank copies, none
STANDARDIZE_MODES: tuple[str, ...] = ("none", "channel", "position")  # task statistics applied to F
BASE_SHARING_MODES: tuple[str, ...] = ("frozen", "sequential", "separate")
ADAPTERS: tuple[str, ...] = ("whitening", "none")
ROUTER_KINDS: tuple[str, ...] = ("prototype", "positional", "nearest")


def floor_problem(standardize: str, floor: float) -> str | None:
    """Why ``model.flow.standardize_floor`` cannot be used with ``standardize``, or None when it can."""
    if floor > 0 and standardize != "position":
        return (
            f"model.flow.standardize_floor={floor} floors the per-position spread: it needs "
            f"model.flow.standardize=position (got {standardize!r}); set it, or standardize_floor=0."
        )
    return None


def floor_noise_problem(floor: float, noise: bool) -> str | None:
    """Why ``model.flow.standardize_floor_noise`` cannot be used with ``floor``, or None when it can."""
    if noise and not floor > 0:
        return (
            "model.flow.standardize_floor_noise=true trains with noise of the spread floor's size: it needs "
            f"model.flow.standardize_floor > 0 (got {floor}); set it, or standardize_floor_noise=false."
        )
    return None


def vote_problem(kind: str, global_vote: bool) -> str | None:
    """Why ``model.flow.router_global_vote`` cannot be used with router ``kind``, or None when it can."""
    if global_vote and kind != "positional":
        return (
            "model.flow.router_global_vote needs model.flow.router=positional (the prototype router is global); "
            "use model/router=robust, or set model.flow.router_global_vote=false."
        )
    return None


_ODD_KERNEL = "0 (off) or a positive odd number (an even kernel changes the patch grid)"


def _odd_or_zero(v: int) -> bool:
    return v == 0 or (v > 0 and v % 2 == 1)


@dataclass
class MoLEFlowConfig:
    """Hyperparameters of the flow head: default, type and range of each ``model.flow.*`` key, once.

    The defaults are the MAIN configuration (docs/method.md); the config schema registers this class for
    ``model.flow`` (``moleflow.config.schema``), and :meth:`validate` checks the declared ranges.
    """

    embed_dim: int = setting(768, "a positive multiple of 4", lambda v: v >= 4 and v % 4 == 0)
    ncl: int = setting(6, ">= 0 (0 = no coupling blocks)", lambda v: v >= 0)
    hidden: int = setting(768, ">= 1", lambda v: v >= 1)
    clamp: float = setting(1.9, "> 0", lambda v: v > 0)
    subnet_scale: float = 0.1
    scale_context_kernel: int = setting(5, _ODD_KERNEL, _odd_or_zero)
    spatial_context_kernel: int = setting(3, _ODD_KERNEL, _odd_or_zero)
    mixer_gate_init: float = 0.5
    expert_mode: str = setting("lora", choices=EXPERT_MODES)
    lora_rank: int = setting(64, ">= 1", lambda v: v >= 1)
    lora_alpha: float = 1.0
    adapter: str = setting("whitening", choices=ADAPTERS)
    adapter_gate_init_first: float = -0.7
    adapter_gate_init_later: float = 0.0
    dia_blocks: int = setting(0, ">= 0 (0 = no DIA)", lambda v: v >= 0)
    dia_clamp: float = setting(1.9, "> 0", lambda v: v > 0)
    positional_encoding: bool = True
    # none (MAIN) | channel | position: task statistics applied to F before the PE
    standardize: str = setting("none", choices=STANDARDIZE_MODES)
    # spread floor of the per-position statistics, times the channel's spread (0 = none; docs/quality.md)
    standardize_floor: float = setting(0.0, ">= 0 (0 = no floor)", lambda v: v >= 0)
    # training features get Gaussian noise of the floor's size, so the flow learns the spread the floor assumes
    standardize_floor_noise: bool = False
    base_sharing: str = setting("frozen", choices=BASE_SHARING_MODES)
    router_ridge: float = setting(1e-5, "> 0", lambda v: v > 0)
    # prototype (MAIN: global mean, Mahalanobis) | positional (issue 14, docs/routing.md)
    router: str = setting("prototype", choices=ROUTER_KINDS)
    router_grid: int = setting(7, ">= 1", lambda v: v >= 1)  # positional: cells per side of the pooled grid
    # positional: share of an image's cells (the best-fitting) that decide
    router_keep: float = setting(0.25, "in (0, 1]", lambda v: 0 < v <= 1)
    # positional: added variance, times the task's mean variance
    router_variance_floor: float = setting(0.1, "> 0", lambda v: v > 0)
    # positional: the rank of a global Gaussian votes too (issue 14, docs/routing.md)
    router_global_vote: bool = False
    # nearest: how many of a task's stored training images decide its distance (docs/routing.md)
    router_neighbors: int = setting(1, ">= 1", lambda v: v >= 1)
    permutation_seed: int = 0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MoLEFlowConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            msg = f"Unknown model.flow keys {unknown}; known keys: {sorted(known)}."
            raise ValueError(msg)
        return cls(**values)

    def validate(self) -> None:
        """Reject impossible settings early, naming the config key (the ranges declared above)."""
        problems = range_problems(self, "model.flow")
        if (vote := vote_problem(self.router, self.router_global_vote)) is not None:
            problems.append(vote)
        if (floor := floor_problem(self.standardize, self.standardize_floor)) is not None:
            problems.append(floor)
        if (noise := floor_noise_problem(self.standardize_floor, self.standardize_floor_noise)) is not None:
            problems.append(noise)
        if problems:
            raise ValueError(problems[0])
