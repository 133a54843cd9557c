"""OmegaConf resolvers the configs use, registered by :func:`moleflow.config.register` (the entry points call it
when imported, so a launcher's worker has them before it resolves the job's folder name, and again in the
task function; the tests' conftest calls it too).

- ``${ablation_rows:TABLE}``: the ``+ablation`` sweep of a table, from the ablation files' ``table_rows``
  (``conf/experiment/table*.yaml``), so that adding a row is one file.
- ``${sweep_group:NAME}``: the W&B group: NAME for a run, NAME and the multirun's start time for a multirun job.
- ``${path_safe:TEXT}``: TEXT with every ``/`` written as ``-``, for folder names made from overrides
  (``model/backbone=efficientnet_lite0`` would otherwise split a multirun job's folder in two).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from moleflow.config.ablation_rows import sweep_of


def sweep_group(name: object) -> str:
    """The W&B group of a job: ``name`` for a single run; for a job of a multirun, ``name`` and the multirun's
    start time (its folder's name), so that one ``-m`` sweep is one dashboard group and not the group of every
    other plain run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return f"{name}-{Path(HydraConfig.get().sweep.dir).name}"
    return str(name)


def path_safe(text: object) -> str:
    """One folder name from any text: path separators become ``-``."""
    return str(text).replace("/", "-").replace("\\", "-")


def _conf_dir() -> Path:
    """The configs this moleflow runs with: ``moleflow/conf`` inside an installed wheel (package data), else the
    repository's top-level ``conf/`` (a clone, or an editable install)."""
    packaged = Path(__file__).resolve().parents[1] / "conf"
    return packaged if (packaged / "train.yaml").is_file() else Path(__file__).resolve().parents[3] / "conf"


DEFAULT_CONF_DIR = _conf_dir()


def register_resolvers(conf_dir: Path | str = DEFAULT_CONF_DIR) -> None:
    """Register (again, idempotently) the resolvers for the configs in ``conf_dir``."""
    ablation_dir = Path(conf_dir) / "ablation"
    OmegaConf.register_new_resolver("ablation_rows", lambda table: sweep_of(ablation_dir, table), replace=True)
    OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)
    OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)
