"""Seeded train/test splits of normal/defective pools, and seeded caps on any task's split.

ELPV and Magnetic Tile give a pool of defect-free images and a pool of defective ones; both readers hold
out a seeded share of the normals for testing with :func:`split_pools`. Any source's tasks may then be
capped to fit a time budget (``data.max_train_per_task`` / ``data.max_test_per_task``) with
:func:`limit_split`, so a given seed and category always give the same images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from moleflow.data.folder import STREAM_SPLIT, STREAM_TEST_SUBSET, STREAM_TRAIN_SUBSET, split_normals, task_rng
from moleflow.data.mvtec import CategorySplit, Sample


def check_limit(name: str, value: int | None, minimum: int) -> int | None:
    """None (no limit) or an int >= ``minimum``; anything else is an error naming the option."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        msg = f"{name} must be None (no limit) or an int >= {minimum}, got {value!r}."
        raise ValueError(msg)
    return int(value)


def subsample(samples: Sequence[Sample], k: int, rng: np.random.Generator) -> list[Sample]:
    """k samples drawn without replacement, kept in their original order."""
    if k >= len(samples):
        return list(samples)
    keep = np.sort(rng.choice(len(samples), size=k, replace=False))
    return [samples[i] for i in keep.tolist()]


def subsample_test(
    normals: list[Sample], anomalous: list[Sample], k: int, rng: np.random.Generator
) -> tuple[list[Sample], list[Sample]]:
    """At most k test samples with the normal/anomalous ratio kept, and at least one of each kind."""
    n_norm, n_anom = len(normals), len(anomalous)
    if n_norm + n_anom <= k:
        return normals, anomalous
    if n_norm == 0 or n_anom == 0:
        return subsample(normals, k, rng), subsample(anomalous, k, rng)
    keep_norm = math.floor(k * n_norm / (n_norm + n_anom) + 0.5)
    keep_norm = min(n_norm, k - 1, max(1, keep_norm))
    keep_anom = min(n_anom, k - keep_norm)
    keep_norm = min(n_norm, k - keep_anom)
    return subsample(normals, keep_norm, rng), subsample(anomalous, keep_anom, rng)


def by_name(samples: Sequence[Sample]) -> list[Sample]:
    """Samples sorted by file name (then full path): a fixed order whatever the folder listing gives."""
    return sorted(samples, key=lambda s: (s.image_path.name, str(s.image_path)))


def split_pools(
    task: str,
    normals: Sequence[Sample],
    anomalous: Sequence[Sample],
    test_normal_fraction: float,
    seed: int,
    label: str | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """(train, test) of one task from its pools: a seeded share of the normals held out for testing.

    The random stream is keyed by ``task`` and ``seed`` (not by the task order); ``label`` names the task
    in errors (e.g. "elpv/mono"). Train keeps the pool order; test is sorted by file name.
    """
    train, test_normals = split_normals(
        list(normals), test_normal_fraction, task_rng(seed, task, STREAM_SPLIT), label or task
    )
    return train, by_name([*test_normals, *anomalous])


def limit_split(split: CategorySplit, max_train: int | None, max_test: int | None, seed: int = 0) -> CategorySplit:
    """A seeded subsample of one category's split, to fit a time budget (``data.max_train_per_task``, ...).

    Training images are drawn without replacement; the test split keeps its normal/defective ratio and at
    least one of each. Order is kept. Streams are keyed by the category name, so a category's subsample
    does not depend on the task order or on the other categories.
    """
    max_train = check_limit("max_train_per_task", max_train, minimum=1)
    max_test = check_limit("max_test_per_task", max_test, minimum=2)
    if max_train is None and max_test is None:
        return split
    train, test = list(split.train), list(split.test)
    if max_train is not None:
        train = subsample(train, max_train, task_rng(seed, split.category, STREAM_TRAIN_SUBSET))
    if max_test is not None:
        normals = [s for s in test if s.label == 0]
        anomalous = [s for s in test if s.label != 0]
        normals, anomalous = subsample_test(
            normals, anomalous, max_test, task_rng(seed, split.category, STREAM_TEST_SUBSET)
        )
        kept = {id(s) for s in [*normals, *anomalous]}
        test = [s for s in test if id(s) in kept]
    return replace(split, train=train, test=test)
