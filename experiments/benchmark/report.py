"""Markdown report of experiments/bench.py: one table per section, kept apart from the measuring code.

Rendering only: every figure comes from the results dict of ``run_benchmark``; nothing is computed
here beyond unit conversions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _f(x: Any, digits: int = 2) -> str:
    """A number for a table cell; '-' for missing values."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 10 ** (-digits) or abs(x) >= 1e7):
            return f"{x:.{digits}e}"
        return f"{x:,.{digits}f}"
    return str(x)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else _f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _machine(res: dict[str, Any]) -> str:
    m = res["machine"]
    rows = [
        ("CPU", m["cpu"]),
        ("logical cores", m["logical_cores"]),
        ("torch threads", m["torch_threads"]),
        ("RAM (GB)", m["ram_gb"]),
        ("GPU", f"{m['gpu']} ({_f(m['gpu_memory_gb'], 1)} GB)" if m["gpu"] else "none (CPU run)"),
        ("device", m["device"]),
        ("dtype", m["dtype"]),
        ("CPU memory allocator", m.get("allocator", "not recorded")),
        ("torch / timm / numpy", f"{m['torch']} / {m['timm']} / {m['numpy']}"),
        ("platform", m["platform"]),
        ("load average (1, 5, 15 min) at start / end", f"{m.get('load_average_start')} / {m.get('load_average_end')}"),
    ]
    return "## Machine\n\n" + _table(("", "value"), rows)


def _targets(res: dict[str, Any]) -> str:
    rows = [
        (
            t["name"],
            t["target"],
            f"{_f(t['measured'], 3)} {t['unit']}",
            "**held**" if t["held"] else "**NOT held**",
            t["detail"],
        )
        for t in res["targets"]
    ]
    return "## Targets (issue 8)\n\n" + _table(("target", "rule", "measured", "status", "detail"), rows)


def _ceiling(res: dict[str, Any]) -> str:
    c = res["ceiling"]
    rows = [
        (r["what"], r["shape"], r["dtype"], r["gflop"], 1e3 * r["best_s"], 1e3 * r["median_s"], r["gflops_best"])
        for r in [
            *c["rows"],
            *(
                [{**c["recheck_after_flow"], "what": "flow shape, re-check after the flow"}]
                if "recheck_after_flow" in c
                else []
            ),
        ]
    ]
    return (
        "## 1. Dense matmul ceiling\n\n"
        + _table(("what", "torch.mm", "dtype", "GFLOP", "best ms", "median ms", "GFLOP/s (best)"), rows)
        + f"\n\nCeiling (float32): **{_f(c['ceiling_gflops'], 1)} GFLOP/s** = {c['definition']}."
    )


def _flow(res: dict[str, Any]) -> str:
    f = res["flow"]
    rows = []
    passes = [
        ("training step (task 0, AdamP)", "train_step"),
        ("inference, merged experts", "inference"),
        ("inference, unmerged experts", "inference_unmerged"),
        ("inference, bf16 autocast", "inference_bf16_autocast"),
    ]
    for label, key in passes:
        if key in f:
            p = f[key]
            rows.append(
                (label, p["best_s"], p["median_s"], p["gflop"], p["gflops_best"], f"{100 * p['ceiling_share']:.1f} %")
            )
    up, mp = f["flop_per_patch_forward_unmerged"], f["flop_per_patch_forward_merged"]
    flop_rows = [
        (k, up[k] / 1e6, mp[k] / 1e6) for k in ("subnet_linears", "lora", "scale_context_conv", "mixer", "total")
    ]
    formula = "\n".join("    " + line.strip() for line in (f["flop_formula"] or "").strip().splitlines())
    step_formula = "\n".join(
        "    " + line.strip() for line in (f.get("train_step_flop_formula") or "").strip().splitlines()
    )
    step = f.get("train_step_flop") or {}
    step_note = (
        f"Training step FLOP: {_f(step['total'] / 1e9)} G as run (experts folded into the training base); the "
        f"method's formula term by term would be {_f(step['unfused_formula'] / 1e9)} G.\n\n"
        if step
        else ""
    )
    return (
        f"## 2. Flow at batch {f['batch']} ({f['patches']:,} patches)\n\n"
        + _table(("pass", "best s", "median s", "GFLOP (computed)", "GFLOP/s (best)", "share of ceiling"), rows)
        + f"\n\nTraining step: {f['train_step']['trainable_parameters']:,} trainable parameters; loss = tail-aware + "
        "logdet, backward, gradient clip 0.5, AdamP step. Unmerged experts take "
        f"{_f(f['unmerged_over_merged_time'])}x the merged time.\n\n"
        + _operator_time(f.get("operator_time", {}))
        + "FLOP per patch, forward, computed from the shapes (MFLOP):\n\n"
        + _table(("part", "unmerged", "merged"), flop_rows)
        + "\n\nFormula:\n\n"
        + formula
        + "\n\n"
        + step_note
        + step_formula
    )


def _operator_time(ops: dict[str, Any]) -> str:
    """Profiler split of one pass: why the flow does or does not reach the matmul ceiling."""
    rows = []
    for label, key in (("training step", "train_step"), ("inference (merged)", "inference")):
        o = ops.get(key)
        if not o:
            continue
        if "error" in o:
            rows.append((label, "-", "-", "-", f"profiler failed: {o['error']}"))
            continue
        sh = o["shares"]
        top = ", ".join(f"{t['op']} {100 * t['share']:.0f} %" for t in o["top_other_ops"][:4])
        if o.get("optimizer_step_share"):
            top += f"; the AdamP step (inclusive) takes {100 * o['optimizer_step_share']:.0f} % of the pass"
        rows.append(
            (
                label,
                f"{100 * sh['matmul']:.0f} %",
                f"{100 * sh['convolution']:.0f} %",
                f"{100 * sh['other']:.0f} %",
                top,
            )
        )
    if not rows:
        return ""
    return (
        f"Operator time of one profiled pass ({next(iter(o for o in ops.values() if o)).get('clock', '')}):\n\n"
        + _table(("pass", "matmul", "convolution", "other", "largest other ops"), rows)
        + "\n\n"
    )


def _inference(res: dict[str, Any]) -> str:
    inf = res["inference"]
    b, one = inf["batch"], inf["single"]
    frame = inf.get("single_frame")
    rows = []
    for stage, v in b["stages"].items():
        w = one["stages"][stage]
        row = [stage, v["ms"], v["ms_per_image"], f"{100 * v['share']:.1f} %", w["ms"], f"{100 * w['share']:.1f} %"]
        if frame:
            row += [frame["stages"][stage]["ms"], f"{100 * frame['stages'][stage]['share']:.1f} %"]
        rows.append(tuple(row))
    total = ["**total**", b["total_ms"], b["total_ms_per_image"], "100 %", one["total_ms"], "100 %"]
    rows.append(tuple(total + ([frame["total_ms"], "100 %"] if frame else [])))
    head = ["stage", f"batch of {b['batch_size']}: ms", "ms / image", "share", "one PNG file: ms", "share"]
    head += ["one camera frame: ms", "share"] if frame else []
    frame_share = (
        f", **{100 * frame['other_share']:.1f} %** (one camera frame, where 'decode' is converting and resizing "
        "the in-memory array)"
        if frame
        else ""
    )
    mixed, merged = inf["routed_mixed"], inf["merged_vs_unmerged"]
    text = (
        f"## 3. Inference split by stage ({inf['tasks_in_model']}-task model)\n\n"
        f"Backbone: {inf['backbone']}. Decode: {inf['decode_source']}. Statistic: {b['statistic']}. "
        f"Distinct routed tasks in the batch: {b['distinct_routed_tasks']}.\n\n"
        + _table(tuple(head), rows)
        + f"\n\nNeither backbone nor flow: **{100 * b['other_share']:.1f} %** (batch), "
        f"**{100 * one['other_share']:.1f} %** (one PNG file){frame_share}; with the patch embedding counted as "
        "'other': "
        f"{100 * b['other_share_with_embedding']:.1f} % / {100 * one['other_share_with_embedding']:.1f} %.\n\n"
        + _stream(inf.get("stream"))
        + "### Routed mixed batch and merged experts\n\n"
        + _table(
            ("comparison", "best ms", "against", "best ms", "ratio", "detail"),
            [
                (
                    f"split by task ({mixed['distinct_tasks']} tasks, batch {mixed['batch_size']})",
                    1e3 * mixed["split_by_task"]["best_s"],
                    "per-image loop",
                    1e3 * mixed["per_image_loop"]["best_s"],
                    f"{_f(mixed['loop_over_split_time'])}x",
                    f"{mixed['flow_passes_split']} flow passes; "
                    f"max abs(split - loop) = {_f(mixed['max_abs_diff_split_vs_loop'], 3)}",
                ),
                (
                    "merged experts",
                    1e3 * merged["merged"]["best_s"],
                    "unmerged",
                    1e3 * merged["unmerged"]["best_s"],
                    f"{_f(merged['unmerged_over_merged_time'])}x",
                    f"max abs diff {_f(merged['max_abs_diff'], 3)}, max rel {_f(merged['max_rel_diff'], 3)} "
                    f"(NLL {_f(merged['nll_range'][0], 1)}..{_f(merged['nll_range'][1], 1)}); "
                    f"{merged['tolerance']}: {'within' if merged['within_tolerance'] else 'OUTSIDE'}",
                ),
                *_exported_row(inf.get("exported_vs_eager")),
            ],
        )
        + f"\n\nMerging one task's experts: {_f(merged['merge_ms_per_task'])} ms ({merged['merge_note']})."
    )
    if "backbone_gpu_options" in inf:
        g = inf["backbone_gpu_options"]
        text += (
            f"\n\nBackbone on the GPU: fp32 {_f(1e3 * g['fp32']['best_s'])} ms, channels_last + bf16 "
            f"{_f(1e3 * g['channels_last_bf16']['best_s'])} ms per batch ({_f(g['speedup'])}x)."
        )
    return text


def _exported_row(ex: dict[str, Any] | None) -> list[tuple[Any, ...]]:
    """The exported head against the eager detector, as one comparison row (none in older results)."""
    if not ex:
        return []
    return [
        (
            f"exported head (batch {ex['batch_size']}, {ex['distinct_routed_tasks']} routed tasks)",
            1e3 * ex["exported"]["best_s"],
            "eager detector",
            1e3 * ex["eager"]["best_s"],
            f"{_f(ex['exported_over_eager_time'])}x",
            f"same tasks: {ex['same_tasks']}; max abs score diff {_f(ex['max_abs_score_diff'], 3)}",
        )
    ]


def _stream(st: dict[str, Any] | None) -> str:
    """A stream of batches, decode overlapped with the model or taking turns, as predict chooses."""
    if not st:
        return ""
    stages = list(st["in_turn"]["ms_per_image"])
    rows = [(k, st["overlapped"]["ms_per_image"][k], st["in_turn"]["ms_per_image"][k]) for k in stages]
    rows.append(("**wall time**", st["overlapped"]["wall_ms_per_image"], st["in_turn"]["wall_ms_per_image"]))
    rows.append(
        (
            "neither backbone nor flow",
            f"{100 * st['overlapped']['other_share']:.1f} %",
            f"{100 * st['in_turn']['other_share']:.1f} %",
        )
    )
    choice = "overlaps" if st["overlap_as_predict"] else "takes turns"
    return (
        f"### A stream of {st['batches']} batches of {st['batch_size']}\n\n"
        "Through `moleflow.utils.prefetch` as `MoLEFlowDetector.predict` and `src/predict.py` run it: the next "
        "batch decoded on a thread pool while this one is in the model (overlapped), or the two taking turns. "
        f"On this machine predict **{choice}** (`overlap_pays_off`: a GPU, or CPU cores torch leaves idle). "
        f"Statistic: {st['statistic']}, the two interleaved. Overlapping takes "
        f"**{_f(st['overlapped_over_in_turn_time'])}x** the time of taking turns.\n\n"
        + _table(("ms / image (stage times inside the stream)", "overlapped", "taking turns"), rows)
        + f"\n\nNeither backbone nor flow: {st['definition']}; the serial model time is "
        f"{_f(st['serial_model_ms_per_image'])} ms per image.\n\n"
    )


def _end_to_end(res: dict[str, Any]) -> str:
    e = res["end_to_end"]
    rows = []
    for label, key in (("feature cache (memory)", "cache"), ("re-extract every epoch (none)", "reextract")):
        r = e[key]
        t = r["timings_s"]
        rows.append(
            (
                label,
                r["wall_s"],
                t.get("extract_train_s"),
                t.get("fit_s"),
                t.get("evaluate_s"),
                r["backbone_images"],
                e["expected_backbone_images"][key],
            )
        )
    return (
        "## 4. One task end to end: feature cache against re-extraction\n\n"
        f"{e['images']['train']} training and {e['images']['test']} test images at {e['images']['size_px']} px "
        f"(generated), {e['epochs']} epochs, batch {e['batch']}; backbone {e['backbone']}; flow {e['flow']}; "
        f"{e['statistic']}.\n\n"
        + _table(("pipeline", "wall s", "extract s", "fit s", "evaluate s", "backbone images", "expected"), rows)
        + f"\n\nRe-extracting takes **{_f(e['reextract_over_cache_time'])}x** the cached run's wall time. "
        f"Training losses bit-identical: {_f(e['losses_bit_identical'])}.\n\nCommand: `{e['command']}`"
    )


def _memory(res: dict[str, Any]) -> str:
    m = res["memory"]
    rows = [
        (k, v["wall_s"], v["start_rss_mb"], v["peak_rss_mb"], v["gpu_peak_allocated_mb"])
        for k, v in m["per_section"].items()
    ]
    meas, comp, main = m["measured"], m["computed_from_shapes"], m["main_15_tasks_computed"]
    ck = m["checkpoint"]
    prow = [
        ("shared", meas["shared"], comp["shared"], main["shared"]),
        ("per task", meas["per_task"][0] if meas["per_task"] else 0, comp["per_task"], main["per_task"]),
        (f"total ({m['tasks']} tasks)", meas["total"], comp["total"], main["total"]),
    ]
    return (
        "## 5. Memory, parameters, checkpoint\n\n"
        + _table(("section", "wall s", "RSS at start MB", "peak RSS MB", "GPU peak allocated MB"), rows)
        + f"\n\nPeak per section: {m['per_section_peak']}. Process peak RSS (ru_maxrss): {_f(m['peak_rss_mb'], 0)} MB."
        + (f" GPU peak allocated: {_f(m['gpu_peak_allocated_mb'], 0)} MB." if m["gpu_peak_allocated_mb"] else "")
        + "\n\n"
        + _table(("parameters", "measured (parameter_counts)", "from shapes", "MAIN, 15 tasks (from shapes)"), prow)
        + f"\n\nMeasured counts match the shapes: {_f(m['matches_shapes'])}. "
        f"Checkpoint of the {m['tasks']}-task model: "
        f"**{_f(ck['mb'], 1)} MB** ({ck['bytes']:,} bytes, {ck['how']}, saved in {_f(ck['save_s'])} s)"
        + (f"; save_checkpoint failed: {ck['error']}" if ck["error"] else "")
        + "."
    )


def _pixels(res: dict[str, Any]) -> str:
    p = res["pixel_metrics"]
    rows = [
        ("pixels", p["pixels"]),
        ("scores", p["scores"]),
        ("time s", p["time_s"]),
        ("ns / pixel", p["ns_per_pixel"]),
        ("extra memory (tracemalloc peak) GB", p["extra_bytes_tracemalloc"] / 1e9),
        ("extra memory (peak RSS delta) GB", p["extra_bytes_rss"] / 1e9 if p["extra_bytes_rss"] is not None else None),
        ("bytes / pixel", p["bytes_per_pixel"]),
        ("inputs (scores + masks) GB", p["input_bytes"] / 1e9),
        ("bound GB", p["bound_bytes"] / 1e9),
        ("bound rule", p["bound_rule"]),
        ("AUROC / AP (sanity)", f"{_f(p['auroc'], 4)} / {_f(p['ap'], 4)}"),
    ]
    scope = (
        ""
        if p["pixels"] == p["full_size_pixels"]
        else f" (reduced: {p['images']} images, not the full {p['full_size_pixels']:,} pixels)"
    )
    return f"## 6. Pixel-level AUROC/AP{scope}\n\n" + _table(("", "value"), rows)


def _estimate(res: dict[str, Any]) -> str:
    e = res["estimate"]
    rows = [(k, v["seconds"] / 3600, v["rule"]) for k, v in e["lines"].items()]
    rows.append(("**total**", e["total_hours"], ""))
    notes = " ".join(n for n in e["notes"] if n)
    cache = (
        " Feature cache for all 5354 images (computed from shapes, float32): "
        f"{_f(e['feature_cache_gb_computed'], 1)} GB."
        if e["feature_cache_gb_computed"]
        else ""
    )
    return (
        f"## 7. Estimated cost of the full MVTec MAIN run\n\n**{e['label']}.**\n\n"
        + _table(("part", "hours", "how"), rows)
        + f"\n\n{notes}{cache}"
    )


def render_markdown(res: dict[str, Any]) -> str:
    """The whole report: header, targets, then one table per section."""
    meta = res["meta"]
    head = [
        "# MoLE-Flow performance benchmark",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; duration {_f(meta.get('duration_s'), 0)} s; mode: **{meta['mode']}**",
    ]
    head += [f"- **{n}**" for n in meta["notes"]]
    parts = [
        "\n".join(head),
        _machine(res),
        _targets(res),
        _ceiling(res),
        _flow(res),
        _inference(res),
        _end_to_end(res),
        _memory(res),
        _pixels(res),
        _estimate(res),
    ]
    return "\n\n".join(parts) + "\n"
