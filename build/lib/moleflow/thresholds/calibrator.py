"""Calibration of a :class:`~moleflow.inference.detector.MoLEFlowDetector`: thresholds from normal images.

Kept apart from the detector so each module has one job: the detector turns images into verdicts;
this mixin finds the per-task thresholds those verdicts use (without defect labels) and stores them.
The threshold maths lives in :mod:`moleflow.thresholds.records`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moleflow.assembly.checkpoint_files import read_checkpoint, write_checkpoint
from moleflow.assembly.integrity import file_sha256
from moleflow.assembly.trusted_targets import UntrustedTargetError
from moleflow.data.inputs import scan_inputs, try_load
from moleflow.evaluation.scoring import score_maps
from moleflow.thresholds.fitting import (
    MIN_ROUTE_IMAGES,
    check_rate,
    cross_validated_distances,
    f1_report,
    fpr_threshold,
    outside_own_route,
    pixel_threshold,
    routing_report,
    tail_threshold,
)
from moleflow.thresholds.records import (
    SECTION,
    SOURCE_HELD_OUT,
    SOURCE_TRAINING,
    Calibration,
    TaskCalibration,
    calibrated_path,
)
from moleflow.utils.progress import track

log = logging.getLogger(__name__)

DEFAULT_FPR = 0.01
DEFAULT_UNKNOWN_RATE = 0.01
DEFAULT_BATCH = 16


def chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive slices of ``items`` of at most ``size`` (batches of images)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


class CalibrationDataError(FileNotFoundError):
    """The images needed for calibration (training or test images of the run) cannot be found."""


class CalibrationMixin:
    """Threshold calibration of the detector; uses its model, extractor, run config and batch scoring."""

    def _datamodule(self, data_root: str | Path | None) -> Any:
        """The run's data (train and test splits of the checkpoint's tasks), or CalibrationDataError."""
        from moleflow.assembly.builders import datamodule_from_stored
        from moleflow.data.datamodule import data_settings_for_reading

        if self.run_config is None:
            msg = "This detector has no run configuration, so it cannot find the training images."
            raise CalibrationDataError(msg)
        data = copy.deepcopy(dict(self.run_config["data"]))
        if data_root is not None:
            data["root"] = str(data_root)
        data = data_settings_for_reading(data)  # never write into a data folder while calibrating
        data["categories"] = list(self.task_names)
        data["num_workers"] = 0
        try:
            return datamodule_from_stored(data, f"The run config of {self.checkpoint}")
        except UntrustedTargetError:
            raise  # never turned into "images not reachable"
        except (FileNotFoundError, OSError, ValueError) as err:
            msg = (
                f"The run's images are not reachable (data.root={data.get('root')}): {err}\nPass data_root=PATH if "
                "the data set moved, or calibrate on held-out defect-free images (normal_dir=FOLDER with one "
                "sub-folder per task)."
            )
            raise CalibrationDataError(msg) from err

    @torch.no_grad()
    def _score_paths(
        self,
        paths: list[Path],
        task: int,
        batch_size: int,
        description: str,
        progress: bool,
        maps: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, np.ndarray, list[str]]:
        """Router features (N, D), scores under ``task``'s expert (N,), and the files that could not be read; with
        ``maps`` (a list), the pixel maps (B, S, S) of each batch are appended to it, as ``predict`` makes them."""
        feats, scores, bad = [], [], []
        batches = list(chunks(paths, batch_size))
        for chunk in track(batches, description, total=len(batches), enabled=progress):
            loaded = []
            for path in chunk:
                item = try_load(path, self.image_size)
                if isinstance(item, str):
                    log.warning("Skipping unreadable calibration image %s: %s", path, item)
                    bad.append(str(path))
                else:
                    loaded.append(item)
            if not loaded:
                continue
            features = self.extractor(torch.stack([x.tensor for x in loaded]).to(self.device))
            tasks = torch.full((features.shape[0],), task, dtype=torch.int64, device=self.device)
            _, s, pixels, _ = score_maps(
                self.model.nll_routed(features, tasks), self.score_top_k, self.image_size, self.pixel_sigma
            )
            if maps is not None:
                maps.append(pixels.cpu())
            feats.append(self.model.router.summarize(features).cpu())
            scores.append(s.double().cpu())
        if not feats:
            msg = f"None of the {len(paths)} calibration images of task {self.task_names[task]!r} could be read."
            raise CalibrationDataError(msg)
        return torch.cat(feats), torch.cat(scores).numpy(), bad

    def _held_out_paths(self, normal_dir: str | Path) -> dict[str, list[Path]]:
        root = Path(normal_dir).expanduser()
        if not root.is_dir():
            msg = f"normal_dir {root} is not a folder; it must hold one sub-folder of defect-free images per task."
            raise CalibrationDataError(msg)
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        unknown = [f for f in folders if f not in self.task_names]
        if unknown:
            msg = f"normal_dir {root} has sub-folders {unknown} that are not tasks of this model {self.task_names}."
            raise ValueError(msg)
        if not folders:
            msg = f"normal_dir {root} has no task sub-folders; expected {root}/<task>/*.png, tasks {self.task_names}."
            raise CalibrationDataError(msg)
        found = {}
        for name in folders:
            scan = scan_inputs(root / name)
            for item in scan.skipped:
                log.warning("Calibration: not read %s (%s)", item["file"], item["reason"])
            found[name] = scan.files
        empty = [name for name, paths in found.items() if not paths]
        if empty:
            msg = f"normal_dir sub-folders {[str(root / n) for n in empty]} hold no images."
            raise CalibrationDataError(msg)
        return found

    def calibrate(
        self,
        normal_dir: str | Path | None = None,
        target_fpr: float = DEFAULT_FPR,
        unknown_rate: float = DEFAULT_UNKNOWN_RATE,
        data_root: str | Path | None = None,
        test_labels: bool = True,
        save: bool | str | Path = False,
        batch_size: int = DEFAULT_BATCH,
        progress: bool = False,
    ) -> Calibration:
        """Calibrate every task's score and unknown-category thresholds on defect-free images, and use them.

        Args:
            normal_dir: held-out defect-free images, ``normal_dir/<task>/**/*.png`` (recommended). Tasks without a
                sub-folder, or all tasks when None, use their training images (in-sample: optimistic thresholds).
            target_fpr: allowed share of normal images above the score threshold.
            unknown_rate: allowed share of normal images of a known task flagged "unknown category".
            data_root: where the run's data set is now, if it moved.
            test_labels: also report the F1-optimal threshold per task on the run's labelled test set, if present.
            save: True: write ``<checkpoint>.calibrated.ckpt`` next to the checkpoint; a path: write there.
            batch_size: images per backbone batch.
            progress: show progress bars.

        Returns:
            The calibration (also stored in ``self.calibration``; threshold overrides are kept).
        """
        check_rate("target_fpr", target_fpr)
        check_rate("unknown_rate", unknown_rate)
        held = self._held_out_paths(normal_dir) if normal_dir is not None else {}
        dm = None
        if len(held) < len(self.task_names):
            dm = self._datamodule(data_root)
        n_tasks = len(self.task_names)
        tasks: dict[str, TaskCalibration] = {}
        held_dists: dict[str, torch.Tensor] = {}
        for t, name in enumerate(self.task_names):
            if name in held:
                paths, source = held[name], SOURCE_HELD_OUT
            else:
                paths, source = [s.image_path for s in dm.train_dataset(t).samples], SOURCE_TRAINING
                if normal_dir is not None:
                    log.warning("normal_dir has no folder for task %s: calibrating it on its training images.", name)
            maps: list[torch.Tensor] = []
            feats, scores, _ = self._score_paths(
                paths, t, batch_size, f"Calibrating {name} ({source})", progress, maps=maps
            )
            score_thr, fpr = fpr_threshold(scores, target_fpr)
            pixel_thr, pixel_fpr = pixel_threshold(torch.cat(maps), target_fpr)
            if source == SOURCE_HELD_OUT:
                dists = self.model.router.distances(feats.to(self.device), n_tasks).cpu()
                held_dists[name] = dists
                own = dists[:, t]
            elif feats.shape[0] >= MIN_ROUTE_IMAGES:
                own = cross_validated_distances(feats, self.model.router)
            else:
                own = torch.empty(0, dtype=torch.float64)
            route_thr = tail_threshold(own.numpy(), unknown_rate, float(self.model.router.floors(n_tasks)[t]))
            if not math.isfinite(route_thr):
                log.warning("Task %s: too few images to calibrate its unknown-category threshold.", name)
            tasks[name] = TaskCalibration(
                score_threshold=score_thr,
                score_source=source,
                score_images=int(scores.size),
                calibration_fpr=fpr,
                route_threshold=route_thr,
                route_source=source,
                route_images=int(own.numel()),
                score_median=float(np.median(scores)),
                pixel_threshold=pixel_thr,
                pixel_fpr=pixel_fpr,
                pixel_images=int(scores.size),
            )
        route = torch.tensor([tasks[n].route_threshold for n in self.task_names], dtype=torch.float64)
        for t, name in enumerate(self.task_names):
            if name in held_dists:
                d = held_dists[name]
                tasks[name].held_out_routing = {
                    "images": int(d.shape[0]),
                    "routed_to_other_task": int((d.argmin(dim=1) != t).sum()),
                    "flagged_unknown": int(outside_own_route(d, route).sum()),
                }
        if test_labels:
            self._test_reports(tasks, dm, data_root, batch_size, progress, route)
        calibration = Calibration(
            target_fpr=float(target_fpr),
            unknown_rate=float(unknown_rate),
            score_top_k=self.score_top_k,
            tasks=tasks,
        )
        self._set_source(calibration)
        self.calibration = calibration
        for note in calibration.notes():
            log.warning(note)
        if save:
            self.save_calibration(None if save is True else save)
        return calibration

    def _test_reports(
        self,
        tasks: dict[str, TaskCalibration],
        dm: Any,
        data_root: str | Path | None,
        batch_size: int,
        progress: bool,
        route_thresholds: torch.Tensor | None = None,
    ) -> None:
        """F1-optimal threshold per task on the run's labelled test images (reported, never the default).

        With ``route_thresholds`` (T,) the report also counts, separately for defect-free and defective test
        images, how many are routed to another task and how many are flagged "unknown category".
        """
        try:
            dm = dm if dm is not None else self._datamodule(data_root)
        except CalibrationDataError as err:
            for cal in tasks.values():
                cal.test_report = {"available": False, "reason": f"test images not reachable: {err}"}
            return
        for t, name in enumerate(self.task_names):
            samples = dm.test_dataset(t).samples
            labels = np.array([s.label for s in samples])
            feats, scores, bad = self._score_paths(
                [s.image_path for s in samples], t, batch_size, f"Test scores {name}", progress
            )
            if bad:
                unreadable = set(bad)
                labels = labels[np.array([str(s.image_path) not in unreadable for s in samples])]
            tasks[name].test_report = f1_report(scores, labels, tasks[name].score_threshold)
            if route_thresholds is not None:
                dists = self.model.router.distances(feats.to(self.device), len(self.task_names)).cpu()
                tasks[name].test_report["routing_by_label"] = routing_report(dists, t, labels, route_thresholds)

    def _set_source(self, calibration: Calibration) -> None:
        """Record which original checkpoint (path and content hash) the calibration belongs to."""
        previous = self.calibration
        if previous is not None and previous.source_sha256 is not None and self.checkpoint is not None:
            if calibrated_path(self.checkpoint) == self.checkpoint:  # recalibrating a calibrated copy
                calibration.source_checkpoint = previous.source_checkpoint
                calibration.source_sha256 = previous.source_sha256
                return
        if self.checkpoint is not None and self.checkpoint.is_file():
            calibration.source_checkpoint = str(self.checkpoint)
            calibration.source_sha256 = file_sha256(self.checkpoint)

    def save_calibration(self, path: str | Path | None = None) -> Path:
        """Write the checkpoint with the current calibration to ``path`` (default ``<name>.calibrated.ckpt``)."""
        if self.calibration is None:
            msg = "Nothing to save: the detector has no calibration; call calibrate() first."
            raise RuntimeError(msg)
        if self.checkpoint is None:
            msg = "This detector was not loaded from a checkpoint, so there is no checkpoint to store thresholds in."
            raise RuntimeError(msg)
        target = Path(path) if path is not None else calibrated_path(self.checkpoint)
        write_calibrated_checkpoint(self.checkpoint, self.calibration, target, allow_unverified=self.allow_unverified)
        log.info("Calibrated checkpoint written to %s.", target)
        return target


def write_calibrated_checkpoint(
    source: Path | str, calibration: Calibration, target: Path | str, allow_unverified: bool = False
) -> Path:
    """Copy checkpoint ``source`` with ``calibration`` stored in it to ``target``, atomically.

    The checkpoint is otherwise unchanged, so the copy loads wherever the original does (prediction,
    eval.py, resuming). The source's content hash is verified first and the copy gets its own, so a
    damaged source is never copied and a damaged copy is refused when read (a source without a record only
    with ``allow_unverified``, which the user gave when loading it). Written to a unique temporary file,
    flushed and renamed: a crash never leaves a broken file.
    """
    source, target = Path(source), Path(target)
    checkpoint = read_checkpoint(source, allow_unverified=allow_unverified)
    checkpoint["moleflow"][SECTION] = calibration.to_dict()
    return write_checkpoint(checkpoint, target)
