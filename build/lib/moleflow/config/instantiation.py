"""Hydra ``instantiate`` for the run's ``_target_`` entries, with errors a user can act on.

Hydra wraps every exception raised inside a target's constructor in ``InstantiationException``; the
data module's and backbone's own errors (a missing folder, a duplicated category) already name the key
to fix, so they pass through unwrapped. A ``_target_`` that cannot be imported is reported with the key.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf


def build_entry(cfg: Any, key: str, **kwargs: Any) -> Any:
    """``instantiate(cfg, **kwargs)`` for the config entry at ``key`` (e.g. ``data``, ``model.optimizer``)."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if cause is not None and not isinstance(cause, ImportError | AttributeError | InstantiationException):
            raise cause.with_traceback(cause.__traceback__) from None
        target = cfg.get("_target_") if hasattr(cfg, "get") else None
        msg = f"{key}._target_={target!r} cannot be built: {err}"
        raise ValueError(msg) from err


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict of a config group: a DictConfig (resolved), a settings dataclass, a mapping, or None ({})."""
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def to_dict_or_value(value: Any) -> Any:
    """Plain Python for a config node (lists of lists stay lists), scalars unchanged."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value
