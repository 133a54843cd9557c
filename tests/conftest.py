"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from moleflow.data.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated MVTec-layout tree: 3 categories, 64 x 64 images, 12 train / 4 good / 4+4 defect each."""
    root = tmp_path_factory.mktemp("synthetic_mvtec")
    return generate_synthetic_mvtec(root, categories=SYNTHETIC_CATEGORIES[:3], image_size=64)
