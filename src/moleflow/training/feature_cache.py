"""Backbone features computed once per image and reused for every epoch and every evaluation.

The backbone is frozen and the only changes of the training images are fixed, seeded copies
(:mod:`moleflow.data.photometric`, cached as a set of their own), so re-running it every epoch (as the
reference implementation does) only costs time. A :class:`~moleflow.models.feature_extractor.FeatureSet`
holds one split of one task: features F (N, H, W, D) float32, router features (N, D), labels (N,)
and, for test splits, masks (N, S, S) uint8. ``mode="memory"`` keeps sets in RAM; ``mode="disk"``
writes them as .npy files and memory-maps them (for datasets larger than RAM); ``mode="none"``
recomputes on every request (the reference behaviour, kept for benchmarks).

A disk cache folder may be shared by runs and jobs, so its files are keyed on everything that makes the
features: the run's fingerprint (backbone config, embedding size, image size, data root, source and
its options), a hash of the backbone's actual weights, and, per set, every image and mask file's path,
size and modification time. A changed image, another data root or other weights give another key, so
the features are extracted again instead of served stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from moleflow.assembly.integrity import value_hash
from moleflow.config.schema import CACHE_MODES
from moleflow.models.feature_extractor import FeatureExtractor, FeatureSet, router_features
from moleflow.utils.files import atomic_write
from moleflow.utils.progress import track

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor, loader: DataLoader, device: torch.device, description: str, with_masks: bool
) -> FeatureSet:
    """Run the backbone once over ``loader`` (batches of dicts with image/mask/label)."""
    feats, labels, masks = [], [], []
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in track(loader, description, total=total):
        images = batch["image"].to(device, non_blocking=True)
        feats.append(extractor(images).float().cpu())
        labels.append(batch["label"].long().cpu())
        if with_masks:
            masks.append((batch["mask"][:, 0] > 0.5).to(torch.uint8).cpu())
    features = torch.cat(feats)
    return FeatureSet(
        features=features,
        router=router_features(features),
        labels=torch.cat(labels),
        masks=torch.cat(masks) if with_masks else None,
    )


class FeatureCache:
    """Gets the FeatureSet of (task, split), extracting it on first use.

    Args:
        extractor: the frozen feature extractor.
        device: where the backbone runs.
        mode: "memory", "disk" or "none".
        directory: folder for ``mode="disk"``.
        fingerprint: anything that changes the features (backbone, layers, size, D, data root, source options);
            with the backbone's weights hash and each set's files, part of the file names, so a shared cache
            folder never serves stale features.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        device: torch.device,
        mode: str = "memory",
        directory: str | Path | None = None,
        fingerprint: dict | None = None,
    ) -> None:
        if mode not in CACHE_MODES:
            msg = f"training.feature_cache must be one of {CACHE_MODES}, got {mode!r}."
            raise ValueError(msg)
        if mode == "disk" and directory is None:
            msg = "training.feature_cache=disk needs training.feature_cache_dir."
            raise ValueError(msg)
        self.extractor = extractor
        self.device = device
        self.mode = mode
        self.directory = Path(directory) if directory is not None else None
        identity = dict(fingerprint or {})
        if mode == "disk":  # weights of the same name differ (a retrained or random backbone): hash them
            identity["backbone_weights_sha256"] = value_hash(extractor.state_dict())
        self.fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self._memory: dict[str, FeatureSet] = {}
        self.extractions = 0  # number of times a split was run through the backbone

    def get(self, key: str, loader_fn: Callable[[], DataLoader], with_masks: bool) -> FeatureSet:
        """FeatureSet for ``key`` (e.g. "03_carpet/test"); ``loader_fn`` builds the image loader if needed."""
        if key in self._memory:
            return self._memory[key]
        loader = None
        if self.mode == "disk":
            loader = loader_fn()
            stem = self._stem(key, loader, with_masks)
            loaded = self._load(stem)
            if loaded is not None:
                self._memory[key] = loaded
                return loaded
        fs = extract_features(self.extractor, loader or loader_fn(), self.device, f"features {key}", with_masks)
        self.extractions += 1
        if self.mode == "memory":
            self._memory[key] = fs
        elif self.mode == "disk":
            self._save(stem, fs)
            self._memory[key] = self._load(stem)
            return self._memory[key]
        return fs

    def drop(self, key: str) -> None:
        """Forget ``key``'s set in memory (a set used once; on disk it stays for the next run)."""
        self._memory.pop(key, None)

    def test_set(self, dm: Any, task: int, name: str) -> FeatureSet:
        """Task ``task``'s (named ``name``) test features with masks, from ``dm``'s test loader on first use."""
        return self.get(f"{task:02d}_{name}/test", lambda: dm.test_dataloader_for(task), with_masks=True)

    def _stem(self, key: str, loader: DataLoader, with_masks: bool) -> str:
        """File-name stem of a set: its key, the run fingerprint, and a hash of the files it is made of."""
        return f"{key.replace('/', '__')}__{self.fingerprint}__{files_digest(loader, with_masks)}"

    def _paths(self, stem: str) -> tuple[Path, Path]:
        assert self.directory is not None
        return self.directory / f"{stem}.features.npy", self.directory / f"{stem}.meta.pt"

    def _save(self, stem: str, fs: FeatureSet) -> None:
        feat_path, meta_path = self._paths(stem)
        # jobs sharing a cache folder may write the same set at once: each writes under its own name
        with atomic_write(feat_path) as f:
            np.save(f, fs.features.numpy())
        with atomic_write(meta_path) as f:
            torch.save({"router": fs.router, "labels": fs.labels, "masks": fs.masks}, f)

    def _load(self, stem: str) -> FeatureSet | None:
        feat_path, meta_path = self._paths(stem)
        if not (feat_path.is_file() and meta_path.is_file()):
            return None
        meta = torch.load(meta_path, weights_only=True)
        features = torch.from_numpy(np.load(feat_path, mmap_mode="c"))
        return FeatureSet(features=features, router=meta["router"], labels=meta["labels"], masks=meta["masks"])


def _file_identity(path: Path | None) -> list[Any]:
    if path is None:
        return []
    st = Path(path).stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def files_digest(loader: DataLoader, with_masks: bool) -> str:
    """Hash of the files behind a loader's samples, in order: path, size and modification time of each image
    (and mask, for test sets). Reading every file's content would cost as much as decoding it."""
    samples = getattr(loader.dataset, "samples", None)
    if samples is None:
        msg = (
            f"The disk feature cache needs a dataset with .samples (image paths) to key its files on, got "
            f"{type(loader.dataset).__name__}; use training.feature_cache=memory."
        )
        raise TypeError(msg)
    rows = [
        [*_file_identity(s.image_path), *(_file_identity(s.mask_path) if with_masks else []), s.label]
        + ([s.mask_threshold] if with_masks and s.mask_threshold is not None else [])
        for s in samples
    ]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
