"""Data: MVTec-layout, ELPV, VisA, Magnetic Tile, KolektorSDD, BSData, PIPED, CrackForest and user-folder sources
(or several in a row), task grouping, images, datasets, DataModule, synthetic data.

Names are imported lazily, so that `python -m moleflow.data.synthetic` neither loads torch/lightning
nor triggers runpy's "found in sys.modules" warning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moleflow.data.bsdata import bsdata_splits
    from moleflow.data.crackforest import crackforest_splits
    from moleflow.data.datamodule import MPDD_CATEGORIES, ContinualDataModule
    from moleflow.data.datasets import SampleDataset
    from moleflow.data.elpv import ELPV_TASKS, elpv_counts, elpv_labels_csv, elpv_splits
    from moleflow.data.folder import FOLDER_LAYOUTS, folder_splits
    from moleflow.data.grouping import group_splits, parse_scenario
    from moleflow.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, load_mask, load_rgb
    from moleflow.data.kolektor import kolektor_splits
    from moleflow.data.magnetic_tile import MT_DEFECTS, magnetic_tile_splits
    from moleflow.data.mvtec import MVTEC_CATEGORIES, scan_categories, scan_category
    from moleflow.data.piped import PIPED_TASKS, piped_splits
    from moleflow.data.sources import DATA_SOURCES, read_source, read_sources
    from moleflow.data.subsets import split_validation
    from moleflow.data.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec
    from moleflow.data.types import CategorySplit, DatasetLayoutError, Sample
    from moleflow.data.visa import VISA_CATEGORIES, visa_splits

_EXPORTS: dict[str, str] = {
    "ContinualDataModule": "datamodule",
    "DATA_SOURCES": "sources",
    "read_source": "sources",
    "read_sources": "sources",
    "MT_DEFECTS": "magnetic_tile",
    "magnetic_tile_splits": "magnetic_tile",
    "kolektor_splits": "kolektor",
    "bsdata_splits": "bsdata",
    "PIPED_TASKS": "piped",
    "piped_splits": "piped",
    "crackforest_splits": "crackforest",
    "split_validation": "subsets",
    "MPDD_CATEGORIES": "datamodule",
    "SampleDataset": "datasets",
    "ELPV_TASKS": "elpv",
    "elpv_counts": "elpv",
    "elpv_labels_csv": "elpv",
    "elpv_splits": "elpv",
    "FOLDER_LAYOUTS": "folder",
    "folder_splits": "folder",
    "group_splits": "grouping",
    "parse_scenario": "grouping",
    "IMAGENET_MEAN": "images",
    "IMAGENET_STD": "images",
    "ImageReadError": "images",
    "load_mask": "images",
    "load_rgb": "images",
    "MVTEC_CATEGORIES": "mvtec",
    "CategorySplit": "mvtec",
    "DatasetLayoutError": "mvtec",
    "Sample": "mvtec",
    "scan_categories": "mvtec",
    "scan_category": "mvtec",
    "SYNTHETIC_CATEGORIES": "synthetic",
    "generate_synthetic_mvtec": "synthetic",
    "VISA_CATEGORIES": "visa",
    "visa_splits": "visa",
}

__all__ = [
    "DATA_SOURCES",
    "ELPV_TASKS",
    "FOLDER_LAYOUTS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MPDD_CATEGORIES",
    "MT_DEFECTS",
    "MVTEC_CATEGORIES",
    "PIPED_TASKS",
    "SYNTHETIC_CATEGORIES",
    "VISA_CATEGORIES",
    "CategorySplit",
    "ContinualDataModule",
    "DatasetLayoutError",
    "ImageReadError",
    "Sample",
    "SampleDataset",
    "bsdata_splits",
    "crackforest_splits",
    "elpv_counts",
    "elpv_labels_csv",
    "elpv_splits",
    "folder_splits",
    "generate_synthetic_mvtec",
    "group_splits",
    "kolektor_splits",
    "load_mask",
    "load_rgb",
    "magnetic_tile_splits",
    "parse_scenario",
    "piped_splits",
    "read_source",
    "read_sources",
    "scan_categories",
    "scan_category",
    "split_validation",
    "visa_splits",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
