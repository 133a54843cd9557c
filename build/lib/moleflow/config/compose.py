"""Compose a config from Python as the command line would: for tests, notebooks and the experiment scripts.

``compose_config(["experiment=demo"], out_dir)`` returns what ``python src/train.py experiment=demo`` would
run, with Hydra's runtime set (its output folder ``out_dir``), so ``train_job(cfg)`` can be called directly.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from moleflow.config import register
from moleflow.config.resolvers import DEFAULT_CONF_DIR


def compose_config(
    overrides: list[str],
    output_dir: str | Path,
    data_dir: str | Path | None = None,
    config_name: str = "train",
    conf_dir: str | Path = DEFAULT_CONF_DIR,
) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` with ``overrides``, Hydra's runtime config set to ``output_dir``.

    ``data_dir`` replaces ``paths.data_dir`` (where the data sets are). The global Hydra state is cleared
    before and after, so calls do not leak into each other.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    register(conf_dir)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(output_dir)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
    HydraConfig().set_config(cfg)
    GlobalHydra.instance().clear()
    return cfg
