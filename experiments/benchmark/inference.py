"""Inference split by stage, a stream of batches, routed mixed batches and merged experts."""

from __future__ import annotations

import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from experiments.benchmark.measure import sync, time_call, time_pair, unmerged
from experiments.benchmark.settings import MERGE_ATOL, MERGE_RTOL, PIXEL_SIGMA, SCORE_TOP_K, BenchSettings
from moleflow.data.images import load_rgb
from moleflow.data.inputs import to_model_inputs
from moleflow.data.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec
from moleflow.evaluation.anomaly_map import image_scores_topk, pixel_anomaly_map, sanitize_nonfinite
from moleflow.inference.export import ExportableMoLEFlow
from moleflow.inference.pipeline import RoutedPipeline
from moleflow.models.experts import TaskExpertLinear
from moleflow.models.feature_extractor import FeatureExtractor
from moleflow.models.moleflow import SHARED_KEY, MoLEFlowModel
from moleflow.training.lightning_module import MoLEFlowLitModule
from moleflow.utils.prefetch import overlap_pays_off, prefetch


# -------------------------------------------------------------------------------------------- 4. inference
def write_decode_images(directory: Path, count: int, size: int, image_size: int) -> list[Path]:
    """PNGs of ``size`` px for the decode stage: generated textures, upscaled, with the generator's pixel noise.

    Drawn at ``image_size`` with the synthetic generator (fast), then resized to ``size`` and re-noised
    (std 3, as the generator) so the PNGs do not compress better than photographs would.
    """
    cats = list(SYNTHETIC_CATEGORIES)
    per_cat = -(-count // len(cats))
    src = generate_synthetic_mvtec(
        directory / "src", cats, num_train=per_cat, num_test_good=1, num_test_defect=1, image_size=image_size
    )
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        img = Image.open(src / cats[i % len(cats)] / "train" / "good" / f"{i // len(cats):03d}.png").convert("RGB")
        if size != image_size:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.float64) + rng.normal(0.0, 3.0, (size, size, 3))
            img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        path = directory / f"{i:03d}.png"
        img.save(path, format="PNG")
        paths.append(path)
    return paths


class _BackboneClock:
    """Times the CNN inside FeatureExtractor.forward with hooks, to split it from the patch embedding."""

    def __init__(self, backbone: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.elapsed = 0.0
        self._start = 0.0
        backbone.register_forward_pre_hook(self._pre)
        backbone.register_forward_hook(self._post)

    def _pre(self, *_: Any) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def _post(self, *_: Any) -> None:
        sync(self.device)
        self.elapsed += time.perf_counter() - self._start


STAGES = ("decode", "data handling", "backbone CNN", "patch embedding", "routing", "flow", "post-processing")
OTHER_STAGES = ("decode", "data handling", "routing", "post-processing")


def _decode(inputs: list[Any], s: BenchSettings) -> list[torch.Tensor]:
    """Files or camera frames -> (3, S, S) tensors exactly as the detector reads them.

    ``to_model_inputs``: files through load_rgb on a thread pool (all cores); uint8 frames converted
    and resized like a file's pixels.
    """
    return [item.tensor for item in to_model_inputs(inputs, s.image_size)]


def _compute(
    images: list[torch.Tensor],
    s: BenchSettings,
    extractor: FeatureExtractor,
    clock: _BackboneClock,
    model: MoLEFlowModel,
    device: torch.device,
) -> tuple[dict[str, float], torch.Tensor]:
    """Decoded images -> scores and maps, timed per stage; returns the stage times (s) and the features."""
    times: dict[str, float] = {}
    t1 = time.perf_counter()
    batch = torch.stack(images).to(device, non_blocking=True)
    sync(device)
    t2 = time.perf_counter()
    times["data handling"] = t2 - t1
    clock.elapsed = 0.0
    feats = extractor(batch)
    sync(device)
    t3 = time.perf_counter()
    times["backbone CNN"] = clock.elapsed
    times["patch embedding"] = (t3 - t2) - clock.elapsed
    tasks, _ = model.router.route(model.router.summarize(feats), s.tasks)
    sync(device)
    t4 = time.perf_counter()
    times["routing"] = t4 - t3
    nll = model.nll_routed(feats, tasks)
    sync(device)
    t5 = time.perf_counter()
    times["flow"] = t5 - t4
    nll, _ = sanitize_nonfinite(nll.float())
    scores = image_scores_topk(nll, SCORE_TOP_K)
    maps = pixel_anomaly_map(nll, s.image_size, PIXEL_SIGMA)
    scores, maps = scores.cpu(), maps.cpu()
    times["post-processing"] = time.perf_counter() - t5
    return times, feats


def _pipeline(
    paths: list[Any],
    s: BenchSettings,
    extractor: FeatureExtractor,
    clock: _BackboneClock,
    model: MoLEFlowModel,
    device: torch.device,
) -> tuple[dict[str, float], torch.Tensor]:
    """One batch of files or frames, one stage after the other (decode not overlapped), timed per stage."""
    t0 = time.perf_counter()
    images = _decode(paths, s)
    decode = time.perf_counter() - t0
    times, feats = _compute(images, s, extractor, clock, model, device)
    return {"decode": decode, **times}, feats


def _stream(
    paths: list[Path],
    s: BenchSettings,
    extractor: FeatureExtractor,
    clock: _BackboneClock,
    model: MoLEFlowModel,
    device: torch.device,
    overlap: bool,
) -> dict[str, float]:
    """``s.stream_batches`` batches through ``moleflow.utils.prefetch`` as ``MoLEFlowDetector.predict`` runs
    them: with ``overlap`` batch k + 1 is decoded while batch k is in the model, without it the two take
    turns. Returns the wall time and the stage times summed inside it."""
    t0 = time.perf_counter()
    sums = dict.fromkeys(STAGES[1:], 0.0)
    for _, images in prefetch([paths] * s.stream_batches, lambda chunk: _decode(chunk, s), enabled=overlap):
        times, _ = _compute(images, s, extractor, clock, model, device)
        for k, v in times.items():
            sums[k] += v
    return {"wall": time.perf_counter() - t0, **sums}


def _breakdown(runs: list[dict[str, float]], batch: int) -> dict[str, Any]:
    """Median stage times over runs, shares of their sum, and the 'neither backbone nor flow' share."""
    med = {k: statistics.median(r[k] for r in runs) for k in STAGES}
    total = sum(med.values())
    other = sum(med[k] for k in OTHER_STAGES)
    return {
        "batch_size": batch,
        "stages": {k: {"ms": 1e3 * v, "ms_per_image": 1e3 * v / batch, "share": v / total} for k, v in med.items()},
        "total_ms": 1e3 * total,
        "total_ms_per_image": 1e3 * total / batch,
        "other_share": other / total,
        "other_share_with_embedding": (other + med["patch embedding"]) / total,
        "statistic": f"median of {len(runs)} timed runs after warm-up",
    }


def _stream_summary(
    runs: dict[bool, list[dict[str, float]]], s: BenchSettings, serial: dict[str, Any], policy: bool
) -> dict[str, Any]:
    """The stream as predict runs it (``policy``), against the other choice, and what is not the model.

    'Other' is the wall time less the backbone, embedding and flow times of the one-batch serial
    runs: time the model loses to decode threads competing for the cores counts as overhead.
    """
    images = s.batch * s.stream_batches
    core_per_image = sum(serial["stages"][k]["ms_per_image"] for k in ("backbone CNN", "patch embedding", "flow"))
    out: dict[str, Any] = {
        "batches": s.stream_batches,
        "batch_size": s.batch,
        "images": images,
        "overlap_as_predict": policy,
        "serial_model_ms_per_image": core_per_image,
        "statistic": f"median of {len(runs[policy])} timed runs after warm-up",
        "definition": "other = stream wall time - (backbone CNN + patch embedding + flow) of the serial one-batch "
        "runs: decode that is not hidden, decode threads slowing the model, data handling, routing, "
        "post-processing",
    }
    for overlap, label in ((True, "overlapped"), (False, "in_turn")):
        med = {k: statistics.median(r[k] for r in runs[overlap]) for k in runs[overlap][0]}
        wall = 1e3 * med["wall"] / images
        out[label] = {
            "wall_ms_per_image": wall,
            "ms_per_image": {k: 1e3 * v / images for k, v in med.items() if k != "wall"},
            "other_share": (wall - core_per_image) / wall,
        }
    out["overlapped_over_in_turn_time"] = out["overlapped"]["wall_ms_per_image"] / out["in_turn"]["wall_ms_per_image"]
    out["other_share"] = out["overlapped" if policy else "in_turn"]["other_share"]
    return out


def _exported_vs_eager(
    model: MoLEFlowModel, feats: torch.Tensor, s: BenchSettings, device: torch.device
) -> dict[str, Any]:
    """The exported head (the detector's pipeline traced with every task visited) against the eager one.

    Both from the batch's features (the backbone is the same module in both), experts unmerged as the
    detector and the export run them.
    """
    n = model.num_tasks
    eager = RoutedPipeline(torch.nn.Identity(), model, s.image_size, SCORE_TOP_K, PIXEL_SIGMA)
    pipeline = RoutedPipeline(torch.nn.Identity(), model, s.image_size, SCORE_TOP_K, PIXEL_SIGMA, every_task=True)
    exported = ExportableMoLEFlow(pipeline, [math.inf] * n, [math.inf] * n).eval()
    thresholds = (
        exported.score_thresholds,
        exported.route_thresholds,
        exported.score_medians,
        exported.pixel_thresholds,
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(exported, feats[:2], strict=False, check_trace=False)
        got, ref = traced(feats), eager(feats, *thresholds)
        t_exported, t_eager = time_pair(
            lambda: traced(feats), lambda: eager(feats, *thresholds), device, s.repeats, s.warmup
        )
    return {
        "batch_size": int(feats.shape[0]),
        "distinct_routed_tasks": int(torch.unique(ref["task"]).numel()),
        "exported": t_exported,
        "eager": t_eager,
        "exported_over_eager_time": t_exported["best_s"] / t_eager["best_s"],
        "same_tasks": bool(torch.equal(got["task"], ref["task"])),
        "max_abs_score_diff": float((got["score"] - ref["score"]).abs().max()),
        "timing": "interleaved, features to verdicts (TorchScript trace of the export's module)",
    }


def bench_inference(
    s: BenchSettings, module: MoLEFlowLitModule, device: torch.device, scratch: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-batch and per-image inference split by stage; routed mixed batch vs per-image loop; merged vs unmerged.

    Returns the results and a dict of intermediate figures for the estimate.
    """
    model = module.model.eval()
    paths = write_decode_images(scratch / "decode", s.batch, s.decode_source_size, s.image_size)
    extractor = FeatureExtractor(name=s.backbone, layers=("layer2", "layer3"), embed_dim=s.embed_dim, pretrained=False)
    extractor = extractor.to(device)
    if extractor.grid_size(s.image_size) != (s.grid, s.grid):
        msg = f"grid {extractor.grid_size(s.image_size)} differs from the assumed {s.grid} x {s.grid}"
        raise RuntimeError(msg)
    clock = _BackboneClock(extractor.backbone, device)
    out: dict[str, Any] = {
        "backbone": f"{s.backbone} features_only layer2+layer3, RANDOM weights (pretrained weights cannot be "
        "downloaded here; the time does not depend on the weight values)",
        "decode_source": f"{s.batch} generated PNGs of {s.decode_source_size} px, load_rgb -> {s.image_size} px "
        "on a thread pool (as MoLEFlowDetector.predict)",
        "tasks_in_model": s.tasks,
    }
    batch_feats = {}
    with torch.no_grad(), model.merged_experts():
        # a camera frame: the first image's pixels as an in-memory uint8 array (no file, no PNG decode)
        frame = np.asarray(Image.open(paths[0]).convert("RGB"))
        for label, batch_paths in (("batch", paths), ("single", paths[:1]), ("single_frame", [frame])):
            for _ in range(s.warmup):  # also folds the experts into the weights (one-off per task and round)
                _pipeline(batch_paths, s, extractor, clock, model, device)
            runs = []
            for _ in range(s.repeats):
                times, batch_feats[label] = _pipeline(batch_paths, s, extractor, clock, model, device)
                runs.append(times)
            out[label] = _breakdown(runs, len(batch_paths))
        stream_runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
        for _ in range(s.repeats):  # interleaved, so machine noise hits both alike
            for overlap in (True, False):
                stream_runs[overlap].append(_stream(paths, s, extractor, clock, model, device, overlap))
        out["stream"] = _stream_summary(stream_runs, s, out["batch"], overlap_pays_off(device))
        feats = batch_feats["batch"]
        tasks_routed, _ = model.router.route(model.router.summarize(feats), s.tasks)
        out["batch"]["distinct_routed_tasks"] = int(torch.unique(tasks_routed).numel())

        # routed mixed batch: one flow pass per distinct task, against one pass per image
        mixed = (torch.arange(s.batch) % min(s.mixed_tasks, s.tasks)).to(device)
        passes = {"n": 0}

        def count(*_: Any) -> None:
            passes["n"] += 1

        handle = model.flows[SHARED_KEY].register_forward_pre_hook(count)
        split_nll = model.nll_routed(feats, mixed)
        split_passes = passes["n"]
        handle.remove()

        def split() -> torch.Tensor:
            return model.nll_routed(feats, mixed)

        def loop() -> torch.Tensor:
            return torch.cat([model.nll(feats[b : b + 1], int(mixed[b]))[0] for b in range(s.batch)])

        def split_unmerged() -> torch.Tensor:
            with unmerged(model):
                return split()

        split_t, loop_t = time_pair(split, loop, device, s.repeats, s.warmup)
        merged_t, unmerged_t = time_pair(split, split_unmerged, device, s.repeats, s.warmup)
        loop_nll, unmerged_nll = loop(), split_unmerged()
        layers = [m for m in model.modules() if isinstance(m, TaskExpertLinear)]
        merge = time_call(lambda: [layer.merged_weight(0) for layer in layers], device, s.repeats, s.warmup)
    out["routed_mixed"] = {
        "batch_size": s.batch,
        "distinct_tasks": int(torch.unique(mixed).numel()),
        "flow_passes_split": split_passes,
        "split_by_task": split_t,
        "per_image_loop": loop_t,
        "loop_over_split_time": loop_t["best_s"] / split_t["best_s"],
        "max_abs_diff_split_vs_loop": float((split_nll - loop_nll).abs().max()),
        "timing": "interleaved, merged experts",
    }
    diff = (split_nll - unmerged_nll).abs()
    out["merged_vs_unmerged"] = {
        "merged": merged_t,
        "unmerged": unmerged_t,
        "unmerged_over_merged_time": unmerged_t["best_s"] / merged_t["best_s"],
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / unmerged_nll.abs().clamp_min(1e-12)).max()),
        "nll_range": [float(unmerged_nll.min()), float(unmerged_nll.max())],
        "tolerance": f"torch.allclose(merged, unmerged, rtol={MERGE_RTOL:g}, atol={MERGE_ATOL:g})",
        "within_tolerance": bool(torch.allclose(split_nll, unmerged_nll, rtol=MERGE_RTOL, atol=MERGE_ATOL)),
        "merge_ms_per_task": 1e3 * merge["best_s"],
        "merge_note": "W + (alpha / r) B A for every expert linear of one task: once per task per evaluation round",
        "timing": "interleaved, on the routed mixed batch",
    }
    out["exported_vs_eager"] = _exported_vs_eager(model, feats, s, device)
    if device.type == "cuda":  # the GPU options of issue 8.4: channels_last + bf16 autocast for the backbone
        images = torch.stack([load_rgb(p, s.image_size)[0] for p in paths]).to(device)
        fp32 = time_call(lambda: extractor(images), device, s.repeats, s.warmup)
        extractor.configure_runtime(channels_last=True, amp_dtype=torch.bfloat16)
        fast = time_call(lambda: extractor(images), device, s.repeats, s.warmup)
        extractor.configure_runtime(channels_last=False, amp_dtype=None)
        out["backbone_gpu_options"] = {
            "fp32": fp32,
            "channels_last_bf16": fast,
            "speedup": fp32["best_s"] / fast["best_s"],
        }
    extra = {"merge_s_per_task": merge["best_s"]}
    return out, extra
