"""Seeded train/test splits and subsamples for sources that ship normal and defective images without a split.

ELPV and Magnetic Tile give a pool of defect-free images and a pool of defective ones. Both readers hold
out a seeded share of the normals for testing and may cap the sizes of a task (to fit a time budget)
through this one procedure, so a given seed, task name and option set always gives the same split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from moleflow.data.folder import STREAM_SPLIT, STREAM_TEST_SUBSET, STREAM_TRAIN_SUBSET, split_normals, task_rng
from moleflow.data.mvtec import Sample


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
    max_train: int | None = None,
    max_test: int | None = None,
    label: str | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """(train, test) of one task from its pools: a seeded share of normals held out, then optional caps.

    The random streams are keyed by ``task`` and ``seed`` (not by the task order); ``label`` names the
    task in errors (e.g. "elpv/mono"). Train keeps the pool order; test is sorted by file name.
    """
    train, test_normals = split_normals(
        list(normals), test_normal_fraction, task_rng(seed, task, STREAM_SPLIT), label or task
    )
    kept_anomalous = list(anomalous)
    if max_train is not None:
        train = subsample(train, max_train, task_rng(seed, task, STREAM_TRAIN_SUBSET))
    if max_test is not None:
        test_normals, kept_anomalous = subsample_test(
            test_normals, kept_anomalous, max_test, task_rng(seed, task, STREAM_TEST_SUBSET)
        )
    return train, by_name([*test_normals, *kept_anomalous])
