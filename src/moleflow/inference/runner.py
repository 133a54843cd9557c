"""The work behind ``src/predict.py``, without Hydra: predict a folder, calibrate, export.

``predict_folder`` writes, in the output folder:

* ``predictions.csv``: one row per input file (unreadable files included, with the error), written
  batch by batch so a long run keeps what it has done;
* ``predictions.json``: the same rows plus the thresholds in use, where they come from (and the
  in-sample caveat when they come from the training images), counts per verdict, unreadable files, and
  ``skipped``: every file or folder under the input that was not read, with the reason;
* ``masks/<relative path without its extension>.png``: the predicted defect mask at the image's original size
  (255 = defect), whose area and bounding boxes are in the CSV;
* ``overlays/<relative path without its extension>.png``: image + anomaly-map overlay per image (an input
  whose name differs from another's only by the extension keeps it: ``a.jpg.png``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from moleflow.assembly.builders import resolve_device
from moleflow.data.inputs import LoadedImage, scan_inputs, try_load
from moleflow.inference.detector import MoLEFlowDetector
from moleflow.inference.masks import mask_at_original, regions, save_mask
from moleflow.inference.overlay import save_overlay
from moleflow.inference.prediction import VERDICT_DEFECTIVE, VERDICT_NORMAL, VERDICT_UNKNOWN, Prediction
from moleflow.inference.standalone_detector import ExportedDetector, is_exported_model
from moleflow.thresholds.records import Calibration, calibrated_path
from moleflow.utils.files import atomic_write_text, json_safe
from moleflow.utils.prefetch import map_threads, overlap_pays_off, prefetch
from moleflow.utils.progress import track

log = logging.getLogger(__name__)

UNREADABLE = "unreadable"
OVERLAY_CHOICES = ("all", "flagged", "none")
CSV_COLUMNS = (
    "file",
    "verdict",
    "task",
    "task_index",
    "routing_distance",
    "route_threshold",
    "score",
    "normalized_score",
    "threshold",
    "is_defective",
    "is_unknown",
    "decided_by",
    "pixel_threshold",
    "defect_area_px",
    "defect_boxes",
    "mask",
    "original_height",
    "original_width",
    "nonfinite_patches",
    "overlay",
    "error",
)


def _fmt(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return "" if value is None else value


def calibration_summary(calibration: Calibration | None) -> dict[str, Any] | None:
    """What the outputs say about where the thresholds come from."""
    if calibration is None:
        return None
    data = calibration.to_dict()
    data["notes"] = calibration.notes()
    return json_safe(data)


def _relative(path: Path, root: Path) -> Path:
    return Path(path.name) if root.is_file() else path.relative_to(root)


def clashing_stems(paths: list[Path]) -> set[Path]:
    """(folder / stem) of the inputs that share a name but for the extension (``a.jpg`` and ``a.png``)."""
    seen = Counter(p.parent / p.stem for p in paths)
    return {stem for stem, n in seen.items() if n > 1}


def output_name(rel: Path, clashing: set[Path]) -> Path:
    """Where an input's PNG outputs go (overlay, mask): ``sub/part_001.jpg`` -> ``sub/part_001.png``; an input
    whose name only differs from another's by the extension keeps it (``sub/a.jpg.png``, ``sub/a.png.png``)."""
    if rel.parent / rel.stem in clashing:
        return rel.with_name(rel.name + ".png")
    return rel.with_suffix(".png")


def _shown(path: Path, root: Path) -> str:
    """A path under the input folder relative to it (as in predictions.csv), anything else as it is."""
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def predict_folder(
    detector: MoLEFlowDetector | ExportedDetector,
    input_path: str | Path,
    output_dir: str | Path,
    batch_size: int = 16,
    overlays: str = "all",
    progress: bool = True,
) -> dict[str, Any]:
    """Predict every image under ``input_path`` (a file or a folder, recursively); returns predictions.json's payload.

    Unreadable files are listed and skipped; files that are not read at all (other extensions, hidden, broken
    symlinks, folders reached twice through symlinks) are listed in ``skipped`` with the reason. Symlinked
    folders are followed. Images are loaded, run and written ``batch_size`` at a time.
    """
    if overlays not in OVERLAY_CHOICES:
        msg = f"overlays must be one of {OVERLAY_CHOICES}, got {overlays!r}."
        raise ValueError(msg)
    started = time.time()
    root = Path(input_path).expanduser()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    scan = scan_inputs(root, exclude=[out])
    files = scan.files
    skipped = [{"file": _shown(Path(item["file"]), root), "reason": item["reason"]} for item in scan.skipped]
    for item in skipped:
        log.warning("Not read: %s (%s)", item["file"], item["reason"])
    if not files:
        listed = "".join(f"\n  {item['file']}: {item['reason']}" for item in skipped[:20])
        msg = f"No image files under {root} (searched recursively for .png, .jpg, .jpeg, .bmp, .tif, .tiff).{listed}"
        raise FileNotFoundError(msg)
    detector.require_thresholds()  # fail before reading thousands of files
    rows: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    show = progress and len(files) > batch_size
    clashing = clashing_stems([_relative(path, root) for path in files])
    with open(out / "predictions.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        batches = prefetch(
            chunks,
            lambda chunk: map_threads(lambda p: try_load(p, detector.image_size), chunk),
            enabled=overlap_pays_off(detector.device),
        )
        for chunk, items in track(batches, f"Predicting {len(files)} images", total=len(chunks), enabled=show):
            loaded: list[LoadedImage] = []
            errors: dict[Path, str] = {}
            for path, item in zip(chunk, items, strict=True):
                if isinstance(item, str):
                    errors[path] = item
                else:
                    loaded.append(item)
            predictions = iter(zip(loaded, detector.predict_loaded(loaded), strict=True))
            for path in chunk:
                rel = _relative(path, root)
                if path in errors:
                    log.warning("Skipping unreadable file %s: %s", path, errors[path])
                    unreadable.append({"file": str(rel), "error": errors[path]})
                    row = {"file": str(rel), "verdict": UNREADABLE, "error": errors[path]}
                else:
                    item, pred = next(predictions)
                    overlay = None
                    if overlays == "all" or (overlays == "flagged" and pred.verdict != VERDICT_NORMAL):
                        target = out / "overlays" / output_name(rel, clashing)
                        save_overlay(pred, item.tensor, item.path, target)
                        overlay = str(target.relative_to(out))
                    d = pred.as_dict()
                    h, w = pred.original_size or (None, None)
                    row = {
                        "file": str(rel),
                        **{k: d[k] for k in CSV_COLUMNS if k in d},
                        "original_height": h,
                        "original_width": w,
                        **_defect_region(pred, out, output_name(rel, clashing)),
                        "overlay": overlay,
                        "error": None,
                    }
                rows.append(row)
                writer.writerow({k: _fmt(row.get(k)) for k in CSV_COLUMNS})
            handle.flush()
    counts = Counter(row["verdict"] for row in rows)
    calibration = calibration_summary(detector.calibration)
    payload = {
        "checkpoint": str(detector.checkpoint) if detector.checkpoint else None,
        "input": str(root),
        "output_dir": str(out),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "tasks": detector.task_names,
        "thresholds": json_safe(
            {
                "score": detector.thresholds,
                "route": detector.route_thresholds,
                "pixel": detector.pixel_thresholds,
                "score_median": detector.score_medians,
            }
        ),
        "calibration": calibration,
        "notes": (calibration or {}).get("notes", []),
        "counts": {v: counts.get(v, 0) for v in (VERDICT_NORMAL, VERDICT_DEFECTIVE, VERDICT_UNKNOWN, UNREADABLE)},
        "images": len(files),
        "seconds": time.time() - started,
        "unreadable": unreadable,
        "skipped": skipped,  # not images, hidden, broken links, loops: never read, each with the reason
        "predictions": json_safe(rows),
    }
    atomic_write_text(out / "predictions.json", json.dumps(payload, indent=2))
    _print_summary(payload)
    return payload


def _print_summary(payload: dict[str, Any]) -> None:
    console = Console()
    table = Table(title=f"{payload['images']} images from {payload['input']}")
    table.add_column("verdict")
    table.add_column("images", justify="right")
    for verdict, n in payload["counts"].items():
        table.add_row(verdict, str(n))
    console.print(table)
    for item in payload["unreadable"]:
        console.print(f"[yellow]unreadable, skipped:[/yellow] {item['file']}: {item['error']}")
    for item in payload["skipped"]:
        console.print(f"[yellow]not read:[/yellow] {item['file']}: {item['reason']}")
    for note in payload["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"Results: {payload['output_dir']}/predictions.csv, predictions.json, overlays/, masks/")


def _routing_cells(routing: dict[str, Any] | None) -> list[str]:
    """'flagged/images' unknown-category and misrouted counts of the test images, defect-free and defective."""
    if not routing:
        return ["-"] * 4
    cells = []
    for key in ("flagged_unknown", "routed_to_other_task"):
        for kind in ("normal", "defective"):
            row = routing[kind]
            cells.append(f"{row[key]}/{row['images']}" if row["images"] else "-")
    return cells


def print_calibration(calibration: Calibration) -> None:
    """One row per task: sources, thresholds, and the test-set report when labels exist."""
    table = Table(
        title=f"Calibration (target FPR {calibration.target_fpr:g}, unknown rate {calibration.unknown_rate:g})"
    )
    columns = ("task", "source", "images", "score thr", "route thr", "F1-opt thr", "F1-opt", "test FPR", "recall")
    for col in (*columns, "unknown nrm", "unknown def", "misrouted nrm", "misrouted def"):
        table.add_column(col, justify="right")
    for name, t in calibration.tasks.items():
        rep = t.test_report or {}
        ok = rep.get("available", False)

        def num(key: str, rep: dict[str, Any] = rep, ok: bool = ok) -> str:
            return f"{rep[key]:.4g}" if ok and key in rep else "-"

        route = f"{t.route_threshold:.4g}" if math.isfinite(t.route_threshold) else "never"
        table.add_row(
            name,
            t.score_source,
            str(t.score_images),
            f"{t.score_threshold:.4g}",
            route,
            num("f1_optimal_threshold"),
            num("f1_optimal"),
            num("fpr_at_threshold"),
            num("recall_at_threshold"),
            *_routing_cells(rep.get("routing_by_label")),
        )
    Console().print(table)
    for note in calibration.notes():
        Console().print(f"[yellow]note:[/yellow] {note}")


def _threshold_overrides(cfg: DictConfig) -> tuple[Any, Any]:
    def pick(single: Any, per_task: Any) -> Any:
        if per_task is not None:
            return dict(OmegaConf.to_container(per_task, resolve=True))
        return None if single is None else float(single)

    score = pick(cfg.get("threshold"), cfg.get("thresholds"))
    route = pick(cfg.get("route_threshold"), cfg.get("route_thresholds"))
    if not cfg.get("unknown_detection", True):
        route = math.inf
    return score, route


def _defect_region(pred: Prediction, out: Path, name: Path) -> dict[str, Any]:
    """The predicted defect mask of one image in its original pixels: ``masks/<name>.png``, area, boxes."""
    if pred.defect_mask is None:
        return {"defect_area_px": None, "defect_boxes": None, "mask": None}
    mask = mask_at_original(pred.defect_mask, pred.original_size)
    area, boxes = regions(mask)
    target = save_mask(mask, out / "masks" / name)
    return {"defect_area_px": area, "defect_boxes": json.dumps(boxes), "mask": str(target.relative_to(out))}


def run_from_config(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run ``cfg.mode`` (predict | calibrate | export) from conf/predict.yaml's keys; returns its summary."""
    mode = str(cfg.mode)
    if mode not in ("predict", "calibrate", "export"):
        msg = f"mode must be predict, calibrate or export, got {mode!r}."
        raise ValueError(msg)
    if mode == "predict" and cfg.get("input") is None:
        msg = "predict needs input=FOLDER_OR_FILE (an image, or a folder searched recursively)."
        raise ValueError(msg)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def judge(detector: MoLEFlowDetector | ExportedDetector) -> dict[str, Any]:  # predict with this run's settings
        return predict_folder(
            detector,
            cfg.input,
            out,
            batch_size=int(cfg.batch_size),
            overlays=str(cfg.overlays),
            progress=bool(cfg.progress),
        )

    if is_exported_model(cfg.ckpt):  # an exported model judges with its own runtime and baked-in thresholds
        if mode != "predict":
            msg = f"mode={mode} needs the training checkpoint; {cfg.ckpt} is an exported model (mode=predict only)."
            raise ValueError(msg)
        if any(cfg.get(k) is not None for k in ("threshold", "thresholds", "route_threshold", "route_thresholds")):
            msg = "An exported model's thresholds are baked into it: export again with the thresholds you want."
            raise ValueError(msg)
        return judge(ExportedDetector(cfg.ckpt, resolve_device(str(cfg.device))))
    cal_cfg = cfg.calibration
    detector = MoLEFlowDetector.load(
        cfg.ckpt,
        device=resolve_device(str(cfg.device)),
        backbone_weights=cfg.get("backbone_weights"),
        data_root=cfg.get("data_root"),
        auto_calibrate=mode != "calibrate" and cal_cfg.get("normal_dir") is None,
        save_calibration=bool(cal_cfg.save),
        # calibrating on purpose replaces an unusable copy; a plain predict must not lose one quietly
        recalibrate=bool(cal_cfg.get("recalibrate", False) or mode == "calibrate" or cal_cfg.get("normal_dir")),
        expected_sha256=cfg.get("ckpt_sha256"),
        allow_unverified=bool(cfg.get("allow_unverified", False)),
    )
    if mode == "calibrate" or cal_cfg.get("normal_dir") is not None:
        calibrated = detector.calibrate(
            normal_dir=cal_cfg.get("normal_dir"),
            target_fpr=float(cal_cfg.target_fpr),
            unknown_rate=float(cal_cfg.unknown_rate),
            data_root=cfg.get("data_root"),
            test_labels=bool(cal_cfg.test_labels),
            save=bool(cal_cfg.save),
            batch_size=int(cfg.batch_size),
            progress=bool(cfg.progress),
        )
        print_calibration(calibrated)
        summary = calibration_summary(calibrated) or {}
        if cal_cfg.save and detector.checkpoint is not None:
            summary["calibrated_checkpoint"] = str(calibrated_path(detector.checkpoint))
        atomic_write_text(out / "calibration.json", json.dumps(summary, indent=2))
        if mode == "calibrate":
            return summary
    score, route = _threshold_overrides(cfg)
    detector.set_thresholds(score=score, route=route)
    if mode == "export":
        path = detector.export(cfg.export.path, format=str(cfg.export.format))  # adds the format's suffix
        files = [str(path)] + ([str(path.with_suffix(".bin"))] if path.suffix == ".xml" else [])
        return {"exported": str(path), "files": files, "metadata": str(path) + ".json", **threshold_summary(detector)}
    return judge(detector)


def threshold_summary(detector: MoLEFlowDetector) -> dict[str, Any]:
    """The detector's thresholds in use, JSON-ready."""
    return json_safe({"score_thresholds": detector.thresholds, "route_thresholds": detector.route_thresholds})


__all__ = ["calibration_summary", "predict_folder", "print_calibration", "run_from_config", "threshold_summary"]
