"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from moleflow.config import register
from moleflow.data.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec
from moleflow.training.job import train_job
from tests.helpers import CONF_DIR, TINY_OVERRIDES, compose_config

register(CONF_DIR)  # resolvers and schema, as the entry points do before Hydra composes


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated MVTec-layout tree: 3 categories, 64 x 64 images, 12 train / 4 good / 4+4 defect each."""
    root = tmp_path_factory.mktemp("synthetic_mvtec")
    return generate_synthetic_mvtec(root, categories=SYNTHETIC_CATEGORIES[:3], image_size=64)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path):
    """One tiny 3-task run on generated data, shared by the integration tests that only read its outputs."""
    out = tmp_path_factory.mktemp("tiny_run")
    cfg = compose_config([*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null"], out)
    payload = train_job(cfg)
    return cfg, out, payload
