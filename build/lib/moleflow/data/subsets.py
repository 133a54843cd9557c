"""Seeded train/test splits of normal/defective pools, and seeded caps on any task's split.

ELPV and Magnetic Tile give a pool of defect-free images and a pool of defective ones; both readers hold
out a seeded share of the normals for testing with :func:`split_pools`. Data sets whose images come in
groups that look alike (the surfaces of one part, one position photographed over weeks, the tiles of one
photograph) hold out whole groups with :func:`split_groups`, so that no group is both trained on and scored.
Any source's tasks may then be capped to fit a time budget (``data.max_train_per_task`` /
``data.max_test_per_task``) with :func:`limit_split`, so a given seed and category always give the same
images; :func:`split_validation` moves a seeded share of a task's test images into a validation part.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from moleflow.data.folder import (
    STREAM_SPLIT,
    STREAM_TEST_SUBSET,
    STREAM_TRAIN_SUBSET,
    STREAM_VALIDATION,
    check_seed,
    split_normals,
    task_rng,
)
from moleflow.data.types import CategorySplit, Sample


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


def _share_of(n: int, fraction: float) -> int:
    """round(fraction * n), halves rounded up (the rounding of :func:`split_normals`)."""
    return math.floor(fraction * n + 0.5)


def split_groups(
    task: str,
    normals: Sequence[Sample],
    anomalous: Sequence[Sample],
    group_of: Callable[[Sample], str],
    test_group_fraction: float,
    seed: int,
    label: str | None = None,
) -> tuple[list[Sample], list[Sample]]:
    """(train, test) of a task whose images come in groups that must not straddle the split.

    A seeded share of the groups goes to test whole. Groups holding normal and defective images and groups
    holding only normals are drawn separately, each with that share (halves rounded up; at least one group
    with defects, so the test split has some), and at least one group with normals stays for training.
    Groups of defective images only have nothing to train on and always go to test. Train takes the normals
    of the other groups; their defective images are left out, since a group seen in training is not scored.
    The stream is keyed by ``task`` and ``seed``; train keeps the pool order, test is sorted by file name.

    Raises:
        ValueError: Fewer than two groups hold normal images (one is needed on each side).
    """
    name = label or task
    normal_groups = {group_of(s) for s in normals}
    defect_groups = {group_of(s) for s in anomalous}
    if len(normal_groups) < 2:
        msg = (
            f"Task '{name}' has normal images in {len(normal_groups)} group(s): at least 2 are needed, one to "
            "train on and one held out for testing (a group is never split). Add normal images."
        )
        raise ValueError(msg)
    mixed = sorted(normal_groups & defect_groups)
    clean = sorted(normal_groups - defect_groups)
    n_mixed = max(1, _share_of(len(mixed), test_group_fraction)) if mixed else 0
    n_clean = _share_of(len(clean), test_group_fraction)
    if not mixed:
        n_clean = max(1, n_clean)  # the test split needs a normal image
    if n_mixed + n_clean >= len(normal_groups):  # keep a training group, preferably not a group with defects
        if n_clean > 0:
            n_clean -= 1
        else:
            n_mixed -= 1
    rng = task_rng(seed, task, STREAM_SPLIT)
    held = {mixed[i] for i in rng.permutation(len(mixed))[:n_mixed].tolist()}
    held |= {clean[i] for i in rng.permutation(len(clean))[:n_clean].tolist()}
    train = [s for s in normals if group_of(s) not in held]
    test_normals = [s for s in normals if group_of(s) in held]
    test_defects = [s for s in anomalous if group_of(s) in held or group_of(s) not in normal_groups]
    return train, by_name([*test_normals, *test_defects])


def split_validation(split: CategorySplit, share: float, seed: int) -> tuple[CategorySplit, CategorySplit]:
    """(validation, test) views of a category: a seeded share of its test images moved to a validation part.

    Normal and defective test images are drawn separately, each with ``share`` of its count (halves rounded
    up), at least one and at most all but one of each label that has two or more images; a label with a
    single image keeps it in the test view. Both views keep the category's training images; their test lists
    are disjoint, cover the original one and keep its order. The stream is keyed by the category name and
    ``seed``, apart from the streams of the train/test split and of the caps.

    Raises:
        ValueError: ``share`` is not strictly between 0 and 1, or ``seed`` is not a non-negative int.
    """
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 < float(share) < 1.0:
        msg = f"The validation share must be a number strictly between 0 and 1 (e.g. 0.2), got {share!r}."
        raise ValueError(msg)
    rng = task_rng(check_seed(seed), split.category, STREAM_VALIDATION)
    chosen: set[int] = set()
    for defective in (False, True):
        indices = [i for i, s in enumerate(split.test) if (s.label != 0) == defective]
        n = len(indices)
        k = min(n - 1, max(1, _share_of(n, float(share)))) if n >= 2 else 0
        chosen |= {indices[j] for j in rng.permutation(n)[:k].tolist()}
    validation = [s for i, s in enumerate(split.test) if i in chosen]
    test = [s for i, s in enumerate(split.test) if i not in chosen]
    return replace(split, test=validation), replace(split, test=test)


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
