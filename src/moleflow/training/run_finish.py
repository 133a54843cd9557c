"""The last step of a continual run: per-category breakdown, figures, warnings, the results table.

Also closes the loggers, which :func:`moleflow.training.continual.run_continual` does even when a task fails.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from moleflow.evaluation.evaluate import category_breakdown, routing_by_defect_type
from moleflow.evaluation.plots import write_figures
from moleflow.evaluation.report import log_results_table, print_table, write_json_atomic
from moleflow.evaluation.score_records import score_record, write_records
from moleflow.training.run_state import ContinualRun

log = logging.getLogger(__name__)


def finish_run(run: ContinualRun) -> dict[str, Any]:
    """After the last task: per-category breakdown, figures, warnings, the results table; status finished."""
    cfg, dm, names, evaluations = run.cfg, run.dm, run.names, run.evaluations
    tic = time.time()
    payload = run.make_payload()
    if evaluations:  # routing of the last round per defect type (the data set's test sub-folders / grades)
        payload["routing"]["per_defect_type"] = {
            ev.name: routing_by_defect_type(ev, [s.defect_type for s in dm.test_dataset(ev.task).samples])
            for ev in evaluations
        }
    if any(len(dm.task_categories(i)) > 1 for i in range(len(names))) and evaluations:
        payload["per_category"] = {}
        for ev in evaluations:  # the last round: every task, after the last task
            test_set = run.cache.test_set(run.dm, ev.task, ev.name)
            payload["per_category"].update(category_breakdown(ev, dm.test_sample_categories(ev.task), test_set.masks))
    if cfg.report.score_records and evaluations:
        payload["score_records"] = _write_score_records(run)
    if cfg.report.figures and evaluations:
        payload["figures"] = write_figures(
            run.output_dir,
            dm,
            evaluations,
            names,
            run.tracker.confusion,
            cfg.report.overlays_per_task,
            run.loggers,
            run.tracker.confusion_by_label,
            test_masks={ev.task: _test_masks(run, ev) for ev in evaluations if ev.has_masks},
        )
    run.timings["figures_s"] = time.time() - tic
    payload["warnings"] = _collapse_warnings(payload, run.module.skipped_batches)
    for w in payload["warnings"]:
        log.warning(w)
    log_results_table(run.loggers, payload)
    table = print_table(payload, title=f"MoLE-Flow after {len(names)} tasks ({run.output_dir.name})")
    (run.output_dir / "results_table.txt").write_text(table)
    payload["status"] = "finished"
    write_json_atomic(run.output_dir / "metrics.json", payload)
    run.payload = payload
    return payload


def _test_masks(run: ContinualRun, ev: Any) -> torch.Tensor | None:
    """The ground-truth masks (N, S, S) of a task's cached test set."""
    return run.cache.test_set(run.dm, ev.task, ev.name).masks


def _write_score_records(run: ContinualRun) -> dict[str, str]:
    """The last round's per-image results of every task (routed), for intervals and side-by-side maps."""
    records = {}
    for ev in run.evaluations:
        test_set = run.cache.test_set(run.dm, ev.task, ev.name)
        maps = ev.routed_pixel_maps if ev.has_masks else None
        masks = test_set.masks if ev.has_masks else None
        records[ev.name] = score_record(ev.routed_image_scores, ev.labels, maps, masks)
    return write_records(records, run.output_dir / "scores")


def _collapse_warnings(summary: dict[str, Any], skipped: dict[str, int]) -> list[str]:
    """Plain-language warnings for degenerate results (deep flows may collapse: report, don't hide)."""
    warnings = []
    for name, row in summary["per_task"].items():
        if row.get("diverged"):
            warnings.append(f"task {name} diverged and is left out of the means: {row['diverged']}")
        if skipped.get(name):
            warnings.append(f"task {name}: {skipped[name]} training batches skipped for unusable loss")
    means = summary["means"]
    if means["averaged"] < means["of"]:
        warnings.append(f"the means average {means['averaged']} of {means['of']} tasks: {means['tasks']}")
    for name, row in summary["per_task"].items():
        if row["routed"]["image_auroc"] is None or not math.isfinite(row["routed"]["image_auroc"]):
            warnings.append(f"task {name}: image AUROC undefined (its test set lacks normal or defective images)")
    auc = summary["final"]["routed"]["image_auroc"]
    if isinstance(auc, float) and math.isfinite(auc) and auc < 0.6:
        warnings.append(f"mean image AUROC {auc:.3f} is near chance: the flow may have collapsed")
    return warnings


def finish_loggers(loggers: list) -> None:
    """Close every logger; W&B needs an explicit finish or the next multirun job reuses this run."""
    for lg in loggers:
        try:
            lg.finalize("success")
        except Exception as err:  # noqa: BLE001 - closing must not mask the run's own error
            log.warning("Closing logger %s failed: %s", type(lg).__name__, err)
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
