"""The continual run: task after task, train on cached features, fit the router, evaluate all seen tasks.

:func:`run_continual` is a loop over named steps, each a function of the run's shared state
(:class:`ContinualRun`) and the task's round (:class:`TaskRound`), so each can be called and tested alone:

* :func:`open_run`: data, backbone, model (new or resumed), feature cache, loggers;
* per task t (docs/method.md 1 and 5):
  1. :func:`begin_task`: seed, add task t's expert/adapter and set what trains (before the optimizer is built);
  2. :func:`extract_train_features`: extract (once) and cache task t's training features (and those of their
     photometric copies, :func:`extract_photometric_copies`), fit its statistics;
  3. :func:`train_task`: fit with a fresh Trainer (AdamP, cosine + warm-up, clipping);
  4. :func:`fit_router`: task t's routing prototype;
  5. :func:`evaluate_seen_tasks`: tasks 0..t task-agnostically (and with oracle routing), the R matrices;
  6. :func:`report_round`, :func:`save_round`: loggers, a checkpoint and the metrics so far;
* :func:`finish_run` (:mod:`moleflow.training.run_finish`): per-category breakdown, figures, warnings, the results
  table. The shared state is :mod:`moleflow.training.run_state`.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from moleflow.assembly.builders import build_datamodule, build_extractor, resolve_device
from moleflow.assembly.checkpoint_files import link_checkpoint, read_checkpoint
from moleflow.assembly.probes import check_backbone_accepts, check_patch_grid_settings
from moleflow.config.schema import JobConfig
from moleflow.config.typed import job_settings, settings_dict
from moleflow.data.photometric import copy_rows
from moleflow.evaluation.evaluate import (
    EvaluationSpec,
    evaluate_task,
    router_inputs,
)
from moleflow.evaluation.report import ContinualTracker, write_json_atomic
from moleflow.thresholds.held_out import holdout_split, new_calibration, thresholds_from_held_out
from moleflow.thresholds.records import SECTION as CALIBRATION_SECTION
from moleflow.thresholds.records import read_calibration
from moleflow.training.feature_cache import FeatureCache
from moleflow.training.module_checkpoints import save_checkpoint
from moleflow.training.resume import check_finished_run, resolve_resume, restore_run
from moleflow.training.run_finish import finish_loggers, finish_run
from moleflow.training.run_state import ContinualRun, TaskRound
from moleflow.training.task_fit import fit_task
from moleflow.training.trainer_parts import build_loggers, build_module
from moleflow.utils.allocator import keep_freed_memory

log = logging.getLogger(__name__)


def _amp_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "null", "none", "fp32", "32"):
        return None
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    if name in ("fp16", "float16", "16"):
        return torch.float16
    msg = f"runtime.amp must be null, bf16 or fp16, got {name!r}."
    raise ValueError(msg)


def _evaluate_seen(
    model: Any, cache: FeatureCache, dm: Any, names: list[str], t: int, score_cfg: EvaluationSpec, device: torch.device
) -> list[Any]:
    """Evaluate the test sets of tasks 0..t, task-agnostically (routing over t + 1 prototypes)."""
    evaluations = []
    for i in range(t + 1):
        test_set = cache.test_set(dm, i, names[i])
        evaluations.append(evaluate_task(model, test_set, i, names[i], t + 1, score_cfg, device, dm.has_masks(i)))
    return evaluations


def _check_training(tracker: ContinualTracker, module: Any, t: int, name: str) -> list[tuple[str, str]]:
    """Mark task t as diverged if it could not train (every batch skipped); returns [(name, reason)] if newly."""
    attempted, skipped = module.attempted_batches.get(name, 0), module.skipped_batches.get(name, 0)
    if attempted == 0 or skipped == attempted:
        reason = f"could not train: {skipped} of {attempted} training batches skipped (NaN, inf or exploding loss)"
        if tracker.mark_diverged(t, reason):
            return [(name, reason)]
    return []


def _warn_diverged(newly: list[tuple[str, str]]) -> None:
    """One warning per task newly marked as diverged (it is then left out of the means)."""
    for task, reason in newly:
        log.warning("Task %s DIVERGED: %s. It is left out of the means; the run goes on.", task, reason)


def run_continual(
    cfg: DictConfig | JobConfig, output_dir: str | Path, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Run the whole continual study described by ``cfg``; returns the metrics.json payload.

    The composed config is checked (every bad setting named at once, before anything heavy is built) and turned
    into typed settings here, once; the steps below read those.
    """
    settings = job_settings(cfg)
    run = open_run(settings, Path(output_dir), overrides)
    if isinstance(run, dict):  # resume found the run finished
        return run
    try:
        for t in range(run.start_task, len(run.names)):
            task = begin_task(run, t)
            extract_train_features(run, task)
            train_task(run, task)
            fit_router(run, task)
            evaluate_seen_tasks(run, task)
            report_round(run, task)
            save_round(run, task)
        return finish_run(run)
    finally:
        finish_loggers(run.loggers)


def open_run(cfg: JobConfig, output_dir: Path, overrides: list[str] | None) -> ContinualRun | dict[str, Any]:
    """Build the run's parts (data, backbone, model or its resumed state, feature cache, loggers).

    Returns the finished run's payload instead when ``resume`` points at a run that has finished.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    timings: dict[str, Any] = {"per_task": {}}
    device = resolve_device(str(cfg.trainer.get("accelerator", "auto")))
    point = resolve_resume(cfg, output_dir, overrides or [])
    resumed = None
    if point is not None and point.checkpoint is not None:  # checked before anything is built
        resumed = read_checkpoint(
            point.checkpoint,
            expected_sha256=cfg.resume_sha256,
            allow_unverified=cfg.resume_allow_unverified,
        )

    t0 = time.time()
    dm = build_datamodule(cfg.data)
    # Random initialisations are seeded right where they happen, so they do not depend on what ran before:
    # the first run on a machine writes the packaged-weights cache (building a throw-away timm model) and
    # draws random numbers that a later run does not, which gave two different flow initialisations.
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    extractor = build_extractor(cfg.model.backbone, cfg.model.flow.embed_dim).to(device)
    runtime = cfg.runtime  # defaults: moleflow.config.schema.RuntimeConfig
    if runtime.keep_freed_memory:
        keep_freed_memory()  # CPU training steps were ~25 % slower re-faulting each large activation
    amp_dtype = _amp_dtype(runtime.amp)
    extractor.configure_runtime(channels_last=bool(runtime.channels_last), amp_dtype=amp_dtype)
    grid = check_backbone_accepts(extractor, cfg.data["image_size"])
    check_patch_grid_settings(cfg, grid)
    names = dm.task_names
    tracker = ContinualTracker(names)
    start_task = 0
    run_log: dict[str, Any] = {}
    if point is not None and point.run_dir != output_dir and (point.run_dir / "metrics.json").is_file():
        done = json.loads((point.run_dir / "metrics.json").read_text())
        if done.get("status") == "finished":
            check_finished_run(done, cfg, point.run_dir)
            log.info("resume: %s already finished; nothing to do.", point.run_dir)
            return done
    share = cfg.training.calibration_share
    calibration = new_calibration(cfg.training.calibration_fpr, cfg.training.unknown_rate, cfg.model.score.top_k)
    if point is not None and resumed is not None:
        module, start_task = restore_run(resumed, point.checkpoint, cfg, names, tracker, timings, run_log)
        stored = read_calibration(resumed["moleflow"])
        if stored is not None:  # thresholds of the finished tasks, made when each of them ended
            calibration = stored
        output_dir = point.run_dir
    else:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)  # see the note above build_extractor
        module = build_module(cfg.model)
    if runtime.compile:
        for flow in module.model.flows.values():
            flow.forward = torch.compile(flow.forward)  # per instance: state_dict keys stay the same
    timings["setup_s"] = time.time() - t0
    cache = _feature_cache(cfg, extractor, device)
    score_cfg = EvaluationSpec(
        top_k=cfg.model.score.top_k,
        pixel_sigma=cfg.model.score.pixel_sigma,
        image_size=cfg.data["image_size"],
        batch_size=cfg.data["eval_batch_size"],
    )
    loggers = build_loggers(cfg.logger)
    for lg in loggers:
        lg.log_hyperparams(settings_dict(cfg))  # the resolved config, so every dashboard row says what it ran
    return ContinualRun(
        cfg=cfg,
        output_dir=output_dir,
        overrides=overrides,
        device=device,
        dm=dm,
        extractor=extractor,
        module=module,
        names=names,
        tracker=tracker,
        cache=cache,
        score_cfg=score_cfg,
        loggers=loggers,
        amp_dtype=amp_dtype,
        started=started,
        timings=timings,
        run_log=run_log,
        calibration=calibration,
        calibration_share=share,
        start_task=start_task,
    )


def _feature_cache(cfg: JobConfig, extractor: Any, device: torch.device) -> FeatureCache:
    """The run's feature cache, keyed on everything that makes the features."""
    runtime, train_cfg, data = cfg.runtime, cfg.training, cfg.data
    return FeatureCache(
        extractor,
        device,
        mode=train_cfg.feature_cache,
        directory=train_cfg.feature_cache_dir,
        fingerprint={
            "backbone": dict(cfg.model.backbone),
            "d": cfg.model.flow.embed_dim,
            "size": data["image_size"],
            "data_root": str(Path(str(data["root"])).resolve()) if data.get("root") else None,
            "source": data.get("source", "mvtec"),
            "source_options": dict(data.get("source_options") or {}),
            "sources": data.get("sources"),
            "amp": str(runtime.amp),
            "channels_last": runtime.channels_last,
        },
    )


def begin_task(run: ContinualRun, t: int) -> TaskRound:
    """Seed task t, point the data module at it and add its expert, adapter and DIA to the model."""
    name = run.names[t]
    log.info("=== Task %d/%d: %s ===", t + 1, len(run.names), name)
    task = TaskRound(t, name)
    pl.seed_everything(run.cfg.seed + t, workers=True, verbose=False)
    run.dm.set_task(t)
    run.module.start_task(name)
    return task


def _train_key(task: TaskRound) -> str:
    return f"{task.t:02d}_{task.name}/train"


def extract_train_features(run: ContinualRun, task: TaskRound) -> None:
    """Task t's training features (extracted once, cached) and its feature statistics (never changed later)."""
    tic = time.time()
    task.train_set = run.cache.get(_train_key(task), run.dm.train_dataloader, with_masks=False)
    # a seeded share of the (defect-free) training images is held out for the thresholds (0: none)
    task.kept, task.held = holdout_split(len(task.train_set), run.calibration_share, run.cfg.seed + 1000 * (task.t + 1))
    tic_copies = time.time()
    task.copies = extract_photometric_copies(run, task)
    if task.copies is not None:
        task.times["photometric_copies_s"] = time.time() - tic_copies
    run.module.model.fit_task_statistics(task.t, _learned(task, task.train_set.features))
    task.times["extract_train_s"] = time.time() - tic


def extract_photometric_copies(run: ContinualRun, task: TaskRound) -> torch.Tensor | None:
    """Features (copies * N_kept, H, W, D) of the changed copies of the images task t learns from, or None.

    ``training.photometric_copies`` (:mod:`moleflow.data.photometric`); seeded by the run's seed and the task.
    The copies of held-out images are left out, so the thresholds never see a copy of an image they are fitted on.
    """
    train = run.cfg.training
    copies = train.photometric_copies
    if copies == 0:
        return None
    seed, brightness, noise = run.cfg.seed + task.t, train.photometric_brightness, train.photometric_noise
    key = f"{_train_key(task)}_photometric_c{copies}_b{brightness}_n{noise}_s{seed}"
    copy_set = run.cache.get(
        key, lambda: run.dm.photometric_copies_dataloader(copies, brightness, noise, seed), with_masks=False
    )
    n = len(task.train_set)
    features = copy_set.features[copy_rows(n, copies, _kept(task, torch.arange(n)))]
    run.cache.drop(key)  # used once: the copies are not kept in memory for the rest of the run
    return features


def _kept(task: TaskRound, values: torch.Tensor) -> torch.Tensor:
    """The rows of ``values`` (one per training image) the task learns from (all unless some are held out)."""
    return values if task.held is None or len(task.held) == 0 else values[task.kept]


def _learned(task: TaskRound, features: torch.Tensor) -> torch.Tensor:
    """What the flow of task t learns from: the kept training images' features and those of their copies."""
    kept = _kept(task, features)
    return kept if task.copies is None else torch.cat([kept, task.copies])


def train_task(run: ContinualRun, task: TaskRound) -> None:
    """Fit task t with a fresh Trainer; a task that could not train is marked diverged."""
    tic = time.time()
    cache, dm = run.cache, run.dm
    refresh = None
    if cache.mode == "none":  # reference pipeline: the backbone runs again before every epoch

        def refresh(train_key: str = _train_key(task)) -> torch.Tensor:
            return _learned(task, cache.get(train_key, dm.train_dataloader, with_masks=False).features)

    features = _learned(task, task.train_set.features)
    fit_task(run.cfg, run.module, features, task.t, task.name, run.loggers, run.output_dir, refresh)
    task.untrainable = _check_training(run.tracker, run.module, task.t, task.name)
    task.times["fit_s"] = time.time() - tic


def fit_router(run: ContinualRun, task: TaskRound) -> None:
    """Task t's routing prototype from its training features."""
    tic = time.time()
    model = run.module.model.to(run.device).eval()
    task.router_in = router_inputs(model.router, task.train_set)
    model.router.fit_task(task.t, _kept(task, task.router_in))
    task.times["router_s"] = time.time() - tic


def evaluate_seen_tasks(run: ContinualRun, task: TaskRound) -> None:
    """Evaluate tasks 0..t task-agnostically and record the round in the tracker."""
    tic = time.time()
    model = run.module.model
    amp = torch.autocast(run.device.type, dtype=run.amp_dtype) if run.amp_dtype else nullcontext()
    with model.merged_experts(bool(run.runtime.merge_experts)), amp:
        if task.held is not None and len(task.held):
            tic_thr = time.time()
            run.calibration.tasks[task.name] = _task_thresholds(run, task)
            task.times["thresholds_s"] = time.time() - tic_thr
        run.evaluations = _evaluate_seen(model, run.cache, run.dm, run.names, task.t, run.score_cfg, run.device)
    _warn_diverged(task.untrainable + run.tracker.record_round(task.t, run.evaluations))
    task.times["evaluate_s"] = time.time() - tic


def report_round(run: ContinualRun, task: TaskRound) -> None:
    """The round's metrics to the loggers and the console."""
    round_metrics = run.tracker.round_metrics(task.t)
    for lg in run.loggers:
        lg.log_metrics(round_metrics, step=task.t)
    log.info(
        "After task %s: mean image AUROC %.4f, pixel AUROC %.4f, routing %.4f (defect-free %.4f, defective %.4f)",
        task.name,
        round_metrics["mean/image_auroc"],
        round_metrics["mean/pixel_auroc"],
        round_metrics["mean/routing_accuracy"],
        round_metrics["routing/accuracy_normal"],
        round_metrics["routing/accuracy_defective"],
    )


def save_round(run: ContinualRun, task: TaskRound) -> None:
    """Checkpoint after task t (``last.ckpt`` linked to it) and metrics.json with the results so far."""
    run.timings["per_task"][task.name] = task.times
    run.payload = run.make_payload()
    tic = time.time()
    extra = {
        "summary": run.payload["final"],
        "run_config": run.payload["config"],
        "tracker": run.tracker.state_dict(),
        "timings": run.timings,
        "run_log": run.run_log,
    }
    if run.calibration.tasks:  # predict uses these thresholds as they are: no calibration pass
        extra[CALIBRATION_SECTION] = run.calibration.to_dict()
    ckpt_dir = run.output_dir / "checkpoints"
    task_ckpt = save_checkpoint(ckpt_dir / f"task_{task.t:02d}_{task.name}.ckpt", run.module, extra)
    link_checkpoint(task_ckpt, ckpt_dir / "last.ckpt")
    task.times["checkpoint_s"] = time.time() - tic
    write_json_atomic(run.output_dir / "metrics.json", run.payload)
    run.module.model.cpu()


def _task_thresholds(run: ContinualRun, task: TaskRound) -> Any:
    """Task t's thresholds from its held-out training images (:func:`held_out.thresholds_from_held_out`)."""
    cfg, held = run.cfg, task.held
    return thresholds_from_held_out(
        run.module.model,
        task.train_set.features[held],
        task.router_in[held],
        task.t,
        cfg.model.score.top_k,
        cfg.data["eval_batch_size"],
        run.device,
        cfg.training.calibration_fpr,
        cfg.training.unknown_rate,
        image_size=cfg.data["image_size"],
        pixel_sigma=cfg.model.score.pixel_sigma,
    )
