"""The training config's schema: every default, type and range of the method's settings, once.

Registered in Hydra's ConfigStore as ``moleflow_schema`` and listed first in ``conf/train.yaml``'s
defaults, so the YAML files only compose and override. Hydra rejects a value of the wrong type when it
composes (``ncl=4.5``: "could not be converted to Integer, full_key: ncl"); ranges are declared on the
fields (:func:`moleflow.config.settings.setting`) and checked by ``config/checks.py`` before
anything is built.

- ``model.flow`` is :class:`~moleflow.config.flow.MoLEFlowConfig`, ``model.loss``
  :class:`~moleflow.config.loss.LossConfig` and ``model.score`` :class:`~moleflow.config.score.ScoreConfig`: the
  dataclasses the model, the loss and the scoring are built from, so a Python user and a config user get the
  same defaults.
- The study knobs (``ncl``, ``lora_rank``, ...) are top-level keys whose defaults are read from those
  dataclasses; ``conf/model/moleflow.yaml`` points the derived copies at them (``ncl: ${ncl}``).
- Groups that are ``_target_`` entries (``data``, ``model.backbone``, ``model.optimizer``,
  ``model.scheduler``, ``callbacks``, ``logger``) and the Lightning ``trainer`` take their arguments
  from the class they build: their schema is that class's signature, so they are open mappings here.

A new setting is one field here (or on the model's dataclass) plus its row in docs/configuration.md,
which ``tests/unit/test_docs.py`` checks against this schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from moleflow.config.flow import MoLEFlowConfig
from moleflow.config.loss import LossConfig
from moleflow.config.score import ScoreConfig
from moleflow.config.settings import setting

SCHEMA_NAME = "moleflow_schema"
CACHE_MODES: tuple[str, ...] = ("memory", "disk", "none")  # training.feature_cache


@dataclass
class ModelConfig:
    """``model``: the flow, its loss and score (schema here), backbone/optimizer/scheduler (``_target_`` entries)."""

    flow: MoLEFlowConfig = field(default_factory=MoLEFlowConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    backbone: Any = None
    optimizer: Any = None
    scheduler: Any = None


@dataclass
class TrainingConfig:
    """``training``: how long each task trains, on what (photometric copies), its feature cache and thresholds."""

    epochs: int = setting(60, ">= 1", lambda v: v >= 1)  # per task
    # optimizer steps per task instead of epochs (null = use epochs); the cosine then runs per step
    steps: Optional[int] = setting(  # noqa: UP045 (OmegaConf reads typing.Optional, not X | None)
        None, "null (train for training.epochs) or an integer >= 1", lambda v: v >= 1
    )
    feature_cache: str = setting("memory", choices=CACHE_MODES)
    feature_cache_dir: str = "${paths.output_dir}/feature_cache"
    # seeded share of each task's training images held out to fit its thresholds (0 = MAIN)
    calibration_share: float = setting(0.0, "in [0, 1) (0 = no held-out thresholds)", lambda v: 0 <= v < 1)
    calibration_fpr: float = setting(0.01, "in (0, 1), e.g. 0.01", lambda v: 0 < v < 1)
    unknown_rate: float = setting(0.01, "in (0, 1), e.g. 0.01", lambda v: 0 < v < 1)
    # changed copies of each training image (brightness offset, sensor noise) added to what the flow learns
    # from (0 = MAIN: none; moleflow.data.photometric); in 0..1 pixel units
    photometric_copies: int = setting(0, ">= 0 (0 = none)", lambda v: v >= 0)
    photometric_brightness: float = setting(0.04, "in [0, 1] (0.04 = 10 grey levels)", lambda v: 0 <= v <= 1)
    photometric_noise: float = setting(0.01, "in [0, 1] (pixel units, at the input size)", lambda v: 0 <= v <= 1)


@dataclass
class ReportConfig:
    """``report``: figures of each run, and what is kept for later analysis."""

    figures: bool = True  # overlays, routing confusion, ROC curves in <run>/figures (and W&B)
    overlays_per_task: int = setting(6, ">= 0", lambda v: v >= 0)
    # per-image scores, pixel-score histograms and a few maps of the last round, <run>/scores/<task>.npz
    # (moleflow.evaluation.score_records: bootstrap intervals, side-by-side maps; make quality sets it)
    score_records: bool = False


@dataclass
class RuntimeConfig:
    """``runtime``: speed options (mostly for GPUs); the defaults are exact and portable."""

    merge_experts: bool = True  # evaluation folds each task's experts into its base weights
    amp: Optional[str] = None  # noqa: UP045  null | bf16 | fp16: autocast dtype of inference (checked where used)
    channels_last: bool = False
    compile: bool = False
    keep_freed_memory: bool = True


_FLOW, _LOSS = MoLEFlowConfig, LossConfig  # the knobs' defaults are the model's own (one source)


@dataclass
class JobConfig:
    """The whole ``conf/train.yaml``, one training job: run identity, study knobs, and the groups."""

    task_name: str = "train"  # names the logs/<task_name>/ folder
    run_name: str = "${hydra:job.override_dirname}"
    # W&B group: the task name, and for a multirun its start time (one sweep, one dashboard); a table's
    # experiment file sets its table's name
    group: str = "${sweep_group:${task_name}}"
    seed: int = 0
    ablation_name: str = "main"  # +ablation=NAME sets it to NAME, recorded for the tables
    resume: Any = None  # true: the newest unfinished run with the same overrides; or a run dir / .ckpt
    resume_force: bool = False  # resume even though result-changing settings differ (recorded)
    resume_sha256: str | None = None  # expected SHA-256 of the checkpoint resumed from (refused if it differs)
    resume_allow_unverified: bool = False  # resume from a checkpoint without an integrity record (older moleflow)
    # The study's knobs, as plain top-level scalars so that `-m ncl=4,6,8` works as typed.
    ncl: int = _FLOW.ncl
    lora_rank: int = _FLOW.lora_rank
    dia_blocks: int = _FLOW.dia_blocks
    lambda_logdet: float = _LOSS.lambda_logdet
    scale_context_kernel: int = _FLOW.scale_context_kernel
    spatial_context_kernel: int = _FLOW.spatial_context_kernel
    tail_weight: float = _LOSS.tail_weight
    tail_top_k_ratio: float = _LOSS.tail_top_k_ratio
    score_top_k: int = ScoreConfig.top_k
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: Any = None
    trainer: Any = None
    callbacks: Any = None
    logger: Any = None
    paths: Any = None
    table_rows: Any = None  # an ablation file's place in the study's tables


def register_schema() -> None:
    """Store the schema in Hydra's ConfigStore (idempotent), before anything composes ``conf/train.yaml``."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=JobConfig)
