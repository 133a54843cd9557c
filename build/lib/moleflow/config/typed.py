"""The composed config as typed settings, made once at the entry point.

Hydra composes ``conf/train.yaml`` over the schema (:class:`~moleflow.config.schema.JobConfig`); after every
value is checked (:func:`moleflow.config.checks.validate_config`, which reads the raw config to name a study
knob the way the user sets it), :func:`job_settings` turns it into a ``JobConfig`` instance: the method's
groups are dataclasses with real types (no casts down the call chain), the ``_target_`` groups (data,
backbone, optimizer, scheduler, trainer, callbacks, logger, paths) plain dicts for ``instantiate``.
:func:`settings_dict` is the plain form written to metrics.json, checkpoints and loggers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from moleflow.config.checks import validate_config
from moleflow.config.schema import JobConfig


def job_settings(cfg: DictConfig | JobConfig) -> JobConfig:
    """Check ``cfg`` (every bad value named at once) and return it as a typed :class:`JobConfig`.

    A ``JobConfig`` is returned as it is. Hydra's own ``hydra`` node, present when a config is composed with
    ``return_hydra_config=True`` (tests, notebooks), is not part of a job's settings and is left out.
    """
    if isinstance(cfg, JobConfig):
        return cfg
    validate_config(cfg)
    if "hydra" in cfg:
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    settings = OmegaConf.to_object(cfg)
    if not isinstance(settings, JobConfig):
        msg = (
            f"Expected a config composed over the moleflow schema (conf/train.yaml), got a {type(settings).__name__}; "
            "compose conf/train.yaml (its defaults list starts with moleflow_schema) after moleflow.config.register()."
        )
        raise TypeError(msg)
    return settings


def settings_dict(settings: JobConfig) -> dict[str, Any]:
    """The settings as plain dicts and lists (metrics.json's ``config``, a checkpoint's ``run_config``)."""
    return dataclasses.asdict(settings)
