"""Hydra ``instantiate`` for the run's ``_target_`` entries, with errors a user can act on.

Hydra wraps every exception raised inside a target's constructor in ``InstantiationException``; the
data module's and backbone's own errors (a missing folder, a duplicated category) already name the key
to fix, so they pass through unwrapped. A ``_target_`` that cannot be imported is reported with the key.
"""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate


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
