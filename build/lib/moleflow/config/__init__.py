"""Configuration: every setting's declaration (default, type, range), the schema Hydra composes over, the
up-front checks, the resolvers, the ablation rows and composing a config from Python.

- ``flow``, ``loss``, ``score``: the method's own dataclasses (``model.flow``, ``model.loss``, ``model.score``),
  plain Python with no Hydra, so the models build from them anywhere;
- ``schema``: :class:`~moleflow.config.schema.JobConfig`, the whole ``conf/train.yaml``;
- ``checks``: every bad value named at once, before anything is built;
- ``settings``: ``setting(default, allowed, ok)``, a dataclass field that carries its range;
- ``resolvers``, ``ablation_rows``, ``sweeps``: what the YAML files compute (a table's rows and sweeps);
- ``compose``: a config composed as the command line would (tests, notebooks, experiments).

Importing the package registers nothing. Call :func:`register` (idempotent) before Hydra composes a config:
the entry points, the Hydra task function and the tests' conftest do.
"""

from __future__ import annotations

from pathlib import Path


def register(conf_dir: str | Path | None = None) -> None:
    """Register the configs' OmegaConf resolvers and the schema in Hydra's ConfigStore (again: a no-op change).

    ``conf_dir``: the config folder whose ablation files the ``${ablation_rows:...}`` resolver reads; default
    the one this moleflow ships (:data:`moleflow.config.resolvers.DEFAULT_CONF_DIR`).
    """
    from moleflow.config.resolvers import DEFAULT_CONF_DIR, register_resolvers
    from moleflow.config.schema import register_schema

    register_resolvers(conf_dir if conf_dir is not None else DEFAULT_CONF_DIR)
    register_schema()


__all__ = ["register"]
