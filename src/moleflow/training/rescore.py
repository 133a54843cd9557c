"""Re-evaluate a trained run's checkpoint: all its tasks, task-agnostic, for several score settings.

Evaluation-only settings (the image-score top-k, the pixel smoothing sigma) need no retraining:
the NLL maps are computed once per task and every setting is scored from them. It replays the
evaluation step of the training loop (data module, feature cache, checkpoint), so it lives with it in
``training`` (``evaluation`` is the layer below and imports nothing from ``training``).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from rich.console import Console
from rich.table import Table

from moleflow.assembly.builders import datamodule_from_stored, extractor_from_stored, resolve_device
from moleflow.assembly.checkpoint_files import read_checkpoint
from moleflow.assembly.model_files import restore_model
from moleflow.data.datamodule import data_settings_for_reading
from moleflow.evaluation.anomaly_map import image_scores_topk
from moleflow.evaluation.continual_metrics import routing_accuracy, routing_confusion
from moleflow.evaluation.evaluate import EvaluationSpec, TaskEvaluation, evaluate_task
from moleflow.evaluation.metrics import METRIC_NAMES, image_metrics
from moleflow.evaluation.report import write_json_atomic
from moleflow.training.feature_cache import FeatureCache

log = logging.getLogger(__name__)


def _row(evaluations: list[TaskEvaluation], top_k: int, names: list[str]) -> dict[str, Any]:
    per_task: dict[str, Any] = {}
    for ev in evaluations:
        scores = image_scores_topk(ev.routed_nll, top_k)
        per_task[ev.name] = {"routed": ev.routed.as_dict(), "routing_accuracy": ev.routing_accuracy}
        auroc, ap, f1 = image_metrics(scores, ev.labels)
        per_task[ev.name]["routed"].update(image_auroc=auroc, image_ap=ap, image_f1_max=f1)
    means = {m: float(sum(per_task[n]["routed"][m] for n in names) / len(names)) for m in METRIC_NAMES}
    true = torch.cat([torch.full_like(ev.routed_tasks, ev.task) for ev in evaluations])
    pred = torch.cat([ev.routed_tasks for ev in evaluations])
    confusion = routing_confusion(true.numpy(), pred.numpy(), len(names))
    overall, _ = routing_accuracy(confusion)
    return {"score_top_k": top_k, "final": {"routed": means}, "per_task": per_task, "routing_accuracy": overall}


def rescore_checkpoint(
    ckpt_path: str | Path,
    top_ks: list[int],
    data_root: str | None = None,
    pixel_sigma: float | None = None,
    device: str = "cpu",
    expected_sha256: str | None = None,
    allow_unverified: bool = False,
) -> dict[str, Any]:
    """Evaluate every task of the checkpoint on its test set, once per image-score top-k.

    The checkpoint is read without running code and checked before anything is built from it
    (:func:`moleflow.assembly.checkpoint_files.read_checkpoint`); data module and backbone come from its stored
    config through trusted ``_target_`` entries only.
    """
    checkpoint = read_checkpoint(ckpt_path, expected_sha256=expected_sha256, allow_unverified=allow_unverified)
    info = checkpoint["moleflow"]
    if "run_config" not in info:
        msg = f"{ckpt_path} holds no run configuration (made by an older moleflow); retrain to re-score it."
        raise ValueError(msg)
    run_cfg = copy.deepcopy(info["run_config"])
    data = run_cfg["data"]
    if data_root is not None:
        data["root"] = data_root
    data = data_settings_for_reading(data)  # never rewrite data during evaluation
    restored = restore_model(checkpoint, ckpt_path, map_location=device)
    names = restored.task_names
    data["categories"] = names  # the checkpoint's tasks, in training order
    dev = torch.device(device)
    source = f"The run config of checkpoint {ckpt_path}"
    dm = datamodule_from_stored(data, source)
    dm.set_task(len(names) - 1)
    extractor = extractor_from_stored(run_cfg["model"]["backbone"], int(run_cfg["model"]["flow"]["embed_dim"]), source)
    cache = FeatureCache(extractor.to(dev), dev)
    score = EvaluationSpec(
        top_k=int(top_ks[0]),
        pixel_sigma=float(pixel_sigma if pixel_sigma is not None else run_cfg["model"]["score"]["pixel_sigma"]),
        image_size=int(data["image_size"]),
        batch_size=int(data["eval_batch_size"]),
    )
    model = restored.model
    evaluations = []
    merge = bool((run_cfg.get("runtime") or {}).get("merge_experts", False))  # score exactly as training did
    with model.merged_experts(merge):
        for i, name in enumerate(names):
            test = cache.test_set(dm, i, name)
            evaluations.append(evaluate_task(model, test, i, name, len(names), score, dev, dm.has_masks(i)))
    rows = [_row(evaluations, int(k), names) for k in top_ks]
    return {"checkpoint": str(ckpt_path), "tasks": names, "pixel_sigma": score.pixel_sigma, "rows": rows}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """``src/eval.py`` / ``moleflow-eval``: re-score ``cfg.ckpt_path``, write ``eval_metrics.json`` to the run
    folder and print the table."""
    ks = list(cfg.score_top_k) if isinstance(cfg.score_top_k, ListConfig | list) else [int(cfg.score_top_k)]
    result = rescore_checkpoint(
        cfg.ckpt_path,
        ks,
        cfg.data_root,
        cfg.pixel_sigma,
        str(resolve_device(str(cfg.device))),
        expected_sha256=cfg.get("ckpt_sha256"),
        allow_unverified=bool(cfg.get("allow_unverified", False)),
    )
    write_json_atomic(f"{cfg.paths.output_dir}/eval_metrics.json", result)
    table = Table(title=f"Re-scored {cfg.ckpt_path}")
    for col in ("score_top_k", "Img AUC", "Pix AUC", "Img AP", "Pix AP", "Rt Acc"):
        table.add_column(col, justify="right")
    for row in result["rows"]:
        f = row["final"]["routed"]
        cells = [f["image_auroc"], f["pixel_auroc"], f["image_ap"], f["pixel_ap"], row["routing_accuracy"]]
        table.add_row(str(row["score_top_k"]), *[f"{100 * v:.2f}" for v in cells])
    Console().print(table)
    return result
