"""Detection quality on real data, beside the field's standard baseline (``make quality``).

    python -m experiments.quality [--data dev_benchmark] [--split test|validation] [--validation-share 0.3]
                                  [--max-train 200] [--max-test 200] [--preset quality_cpu]
                                  [--row LABEL=override,override ...] [--separated] [--no-preset] [--skip-patchcore]
                                  [--patchcore-ratio 0.1] [--patchcore-cache DIR] [--set key=value ...]
                                  [--bootstrap 1000] [--budget] [--out DIR]

On the same images, backbone, layers and resolution it runs:

- MoLE-Flow with the preset, continual over every task of the data (one run gives the routed and the
  oracle-routed scores);
- with ``--separated``, MoLE-Flow ``+ablation=complete_separated`` (one independent flow per task);
- any extra MoLE-Flow rows given with ``--row`` (e.g. a candidate switch);
- anomalib's ``Patchcore`` trained per task (coreset 10 %, its own scores and maps), kept per task and scored
  part in ``--patchcore-cache`` so that it runs once.

Every category's test images are split, seeded and label-stratified, into a validation part
(``--validation-share``) and the test part: ``--split validation`` scores the first (for choosing settings),
``--split test`` (the default) the second, once per reported configuration. The output folder gets
``quality.{md,csv,json}``: image and pixel AUROC with 95 % bootstrap intervals, AP, AUPRO at 30 % FPR, per
task and mean, routing, minutes per task, each category's difference to PatchCore with the worst one and the
target's checks, and ``overlays/<task>.png``: the same images with the ground truth, MoLE-Flow's and
PatchCore's maps side by side. ``--budget`` instead trains the preset at 1x, 2x and 4x its steps on four
categories and writes ``budget.md``: quality against minutes. Every MoLE-Flow run is kept under ``runs/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from experiments.benchmark.measure import machine_info
from experiments.comparison.overlays import write_side_by_side
from experiments.comparison.patchcore import PatchCoreSettings, cached_patchcore_task
from experiments.tables import quality_table as table
from moleflow.assembly.builders import build_datamodule
from moleflow.config.compose import compose_config
from moleflow.config.instantiation import to_dict
from moleflow.evaluation.score_records import ScoreRecord, bootstrap, read_records
from moleflow.training.job import train_job
from moleflow.utils.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
BUDGET_FACTORS = (1, 2, 4)
BUDGET_CATEGORIES = ("kolektor", "mvtec_bottle", "magnetic_tile", "crackforest")
PART_NOTES = {
    "validation": "the validation part, for choosing settings",
    "test": "the test images minus the validation part, scored once per reported configuration",
}

DESCRIPTIONS = {
    "moleflow": "MoLE-Flow with the preset, continual over the task sequence; scores routed by its own router",
    "oracle": "the same run's scores with the true task's expert (oracle routing)",
    "complete_separated": "MoLE-Flow +ablation=complete_separated: an independent flow per task (no sharing)",
    "patchcore": "anomalib's Patchcore (PatchcoreModel), one per task: memory bank of the task's training "
    "patches, greedy coreset, nearest-neighbour patch scores, its own image score and anomaly map",
}


def _task_seconds(payload: dict[str, Any]) -> dict[str, float]:
    """Each task's wall time in the run: its features, training, router, thresholds and the evaluation after it."""
    per_task = payload.get("timings", {}).get("per_task", {})
    return {
        name: float(sum(v for v in times.values() if isinstance(v, int | float))) for name, times in per_task.items()
    }


def _per_task_from_run(payload: dict[str, Any], mode: str) -> dict[str, dict[str, Any]]:
    seconds = _task_seconds(payload)
    out = {}
    for name, row in payload["per_task"].items():
        entry = dict(row[mode])
        entry["routing_accuracy"] = row["routing_accuracy"] if mode == "routed" else None
        entry["diverged"] = row.get("diverged")  # None, or why: left out of the means
        entry["time_s"] = seconds.get(name) if mode == "routed" else None
        out[name] = entry
    return out


def run_moleflow_row(overrides: list[str], out_dir: Path) -> tuple[dict[str, Any], float]:
    """One MoLE-Flow run (train_job in this process); returns metrics.json's payload and wall seconds."""
    tic = time.perf_counter()
    payload = train_job(compose_config(overrides, out_dir))
    return payload, time.perf_counter() - tic


def run_patchcore(
    overrides: list[str], out_dir: Path, settings: PatchCoreSettings, cache: Path | None
) -> tuple[dict[str, Any], float]:
    """anomalib PatchCore per task on the data and backbone of ``overrides``' config (cached per task and part)."""
    cfg = compose_config(overrides, out_dir)
    dm = build_datamodule(cfg.data)
    backbone = to_dict(cfg.model.backbone)
    tic = time.perf_counter()
    per_task, details, records = {}, {}, {}
    for t, name in enumerate(dm.task_names):
        result = cached_patchcore_task(dm, t, backbone, settings, torch.device("cpu"), cache)
        records[name] = result.pop("record")
        seconds = sum(result["timings"].values())
        per_task[name] = {**result["metrics"], "routing_accuracy": None, "time_s": seconds}
        details[name] = result
    wall = time.perf_counter() - tic
    if any(d.get("cached") for d in details.values()):  # reading a cache takes seconds: report what was measured
        wall = sum(row["time_s"] for row in per_task.values())
    return {"per_task": per_task, "details": details, "records": records, "dm": dm}, wall


def _with_intervals(per_task: dict[str, dict[str, Any]], mean: dict[str, Any], records: dict[str, ScoreRecord], n: int):
    """Attach 95 % bootstrap intervals (image and pixel AUROC) to each task's row and to the mean."""
    if not records or n <= 0:
        return
    kept = {name: rec for name, rec in records.items() if name in per_task and not per_task[name].get("diverged")}
    ci = bootstrap(kept, samples=n)
    for name, row in per_task.items():
        row["ci"] = ci["per_task"].get(name)
    mean["ci"] = ci["mean"]


def _method(label: str, key: str, per_task: dict[str, dict[str, Any]], wall_s: float, **extra: Any) -> dict[str, Any]:
    clean = {
        t: {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None) for k, v in row.items()}
        for t, row in per_task.items()
    }
    records = extra.pop("records", None)
    samples = extra.pop("bootstrap", 0)
    method = {
        "label": label,
        "key": key,
        "description": extra.pop("description", DESCRIPTIONS.get(key, "")),
        "per_task": clean,
        "mean": table.method_mean(clean),
        "wall_s": wall_s,
        **extra,
    }
    _with_intervals(method["per_task"], method["mean"], records or {}, samples)
    return method


def parse_row(text: str) -> tuple[str, list[str]]:
    """``LABEL=override,override`` -> (label, overrides)."""
    label, _, spec = text.partition("=")
    if not label or not spec:
        msg = f"--row must look like LABEL=key=value,key=value; got {text!r}."
        raise argparse.ArgumentTypeError(msg)
    return label, [o for o in spec.split(",") if o]


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="dev_benchmark", help="data config group (conf/data/)")
    parser.add_argument("--split", default="test", choices=("test", "validation"), help="which part is scored")
    parser.add_argument("--validation-share", type=float, default=0.3, help="share of test images kept apart")
    parser.add_argument("--max-train", type=int, default=200, help="training images per task (seeded subsample)")
    parser.add_argument("--max-test", type=int, default=200, help="scored images per task (ratio kept)")
    parser.add_argument("--preset", default="quality_cpu", help="experiment preset of the MoLE-Flow rows")
    parser.add_argument("--row", action="append", type=parse_row, default=[], help="extra row LABEL=overrides")
    parser.add_argument("--separated", action="store_true", help="add the complete_separated row")
    parser.add_argument("--no-preset", action="store_true", help="leave out the preset's own row (candidates only)")
    parser.add_argument("--skip-patchcore", action="store_true")
    parser.add_argument("--patchcore-ratio", type=float, default=0.1, help="coreset share (anomalib default 0.1)")
    parser.add_argument("--patchcore-sampler", default="buffered", choices=("buffered", "anomalib"))
    parser.add_argument("--patchcore-cache", type=Path, default=ROOT / "logs" / "quality" / "patchcore_cache")
    parser.add_argument("--set", action="append", default=[], help="extra override for every row (key=value)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap samples of the intervals (0: none)")
    parser.add_argument("--budget", action="store_true", help="quality against minutes: 1x, 2x, 4x the steps")
    parser.add_argument("--budget-categories", default=",".join(BUDGET_CATEGORIES), help="categories of --budget")
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def _common(args: argparse.Namespace) -> list[str]:
    return [
        f"experiment={args.preset}",
        f"data={args.data}",
        f"data.max_train_per_task={args.max_train}",
        f"data.max_test_per_task={args.max_test}",
        f"data.validation_share={args.validation_share}",
        f"data.evaluate_on={args.split}",
        "logger=csv",
        "report.figures=false",
        "report.score_records=true",
        *args.set,
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _arguments(argv)
    keep_freed_memory()
    started = dt.datetime.now()
    out = args.out or ROOT / "logs" / "quality" / started.strftime("%Y-%m-%d_%H-%M-%S")
    command = "python -m experiments.quality " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    if args.budget:
        return run_budget(args, out, started, command)
    common = _common(args)
    baseline = None
    if not args.skip_patchcore:  # first: several quality runs at once share its cache (one computes, the others read)
        settings = PatchCoreSettings(coreset_ratio=args.patchcore_ratio, sampler=args.patchcore_sampler)
        baseline, baseline_wall = run_patchcore(common, out / "patchcore", settings, args.patchcore_cache)
    rows = [] if args.no_preset else [("MoLE-Flow", "moleflow", [])]
    if args.separated:
        rows.append(("complete separated", "complete_separated", ["+ablation=complete_separated"]))
    rows += [(label, "extra", extra) for label, extra in args.row]
    methods: list[dict[str, Any]] = []
    first_payload: dict[str, Any] | None = None
    first_records: dict[str, ScoreRecord] = {}
    for label, key, extra in rows:
        payload, wall = run_moleflow_row([*common, *extra], out / "runs" / label.replace(" ", "_"))
        first_payload = first_payload or payload
        records = read_records(Path(payload["run"]["output_dir"]) / "scores")
        first_records = first_records or records
        overrides = " ".join(extra) or "(preset only)"
        description = DESCRIPTIONS.get(key, f"MoLE-Flow with {overrides}")
        shared = {"overrides": extra, "records": records, "bootstrap": args.bootstrap}
        methods.append(
            _method(
                f"{label} (routed)",
                key,
                _per_task_from_run(payload, "routed"),
                wall,
                description=description,
                run_dir=payload["run"]["output_dir"],
                **shared,
            )
        )
        methods.append(
            _method(
                f"{label} (oracle)",
                "oracle",
                _per_task_from_run(payload, "oracle"),
                wall,
                description=f"{label}: {DESCRIPTIONS['oracle']}",
                overrides=extra,
            )
        )
    notes = [
        "Rows (routed) and (oracle) of one MoLE-Flow label come from the same run; its minutes per task cover the "
        "task's features, training, router, thresholds and the evaluation of every seen task after it.",
        "Pixel means average the tasks with pixel masks (ELPV has image labels only: n/a).",
        f"Scored part: {args.split} ({PART_NOTES[args.split]}); validation share {args.validation_share} of each "
        "category's test images, seeded and label-stratified.",
    ]
    if args.bootstrap:
        notes.append(
            f"[lo, hi]: 95 % bootstrap interval over {args.bootstrap} resamples of each category's scored images "
            "(normal and defective apart; pixel AUROC from per-image histograms, within 0.1 point of the exact value)."
        )
    if baseline is not None:
        methods.append(
            _method(
                "PatchCore per task",
                "patchcore",
                baseline["per_task"],
                baseline_wall,
                details=baseline["details"],
                settings=vars(settings),
                records=baseline["records"],
                bootstrap=args.bootstrap,
            )
        )
        cached = sum(1 for d in baseline["details"].values() if d.get("cached"))
        notes.append(
            f"PatchCore: anomalib {_anomalib_version()}, coreset ratio {args.patchcore_ratio}, sampler "
            f"{args.patchcore_sampler!r} (buffered = anomalib's greedy k-center with the same operations on "
            "preallocated buffers; it selects the same indices, tested in tests/unit/test_quality_patchcore.py); "
            f"{cached} of {len(baseline['details'])} tasks read from its cache ({args.patchcore_cache}), where their "
            "minutes were measured."
        )
        if first_records:
            figures = write_side_by_side(baseline["dm"], first_records, baseline["records"], out / "overlays")
            notes.append(f"Side-by-side maps of the same images: {', '.join(str(p) for p in figures)}.")
    if first_payload is not None:
        ft = first_payload["forgetting"]["oracle"]
        notes.append(
            "Forgetting of the MoLE-Flow run under oracle routing (FM, image / pixel AUROC): "
            f"{_fmt(ft['image_auroc']['fm'])} / {_fmt(ft['pixel_auroc']['fm'])}."
        )
    result = _result(args, first_payload, methods, notes, started, command)
    result["against_patchcore"] = table.against_baseline(result)
    paths = table.write(result, out)
    print(paths["md"].read_text())
    print(f"Written: {', '.join(str(p) for p in paths.values())}")
    return result


def _result(
    args: argparse.Namespace,
    payload: dict[str, Any] | None,
    methods: list[dict[str, Any]],
    notes: list[str],
    started: dt.datetime,
    command: str,
) -> dict[str, Any]:
    data_desc = (
        f"conf/data/{args.data}.yaml, at most {args.max_train} training and {args.max_test} scored images per task"
    )
    if payload is not None:
        config = payload["config"]
        data_desc += f"; tasks {payload['tasks']}; backbone {config['model']['backbone']['name']} "
        data_desc += f"{config['model']['backbone']['layers']} at {config['data']['image_size']} px"
    info = machine_info(torch.device("cpu"))
    return {
        "title": f"MoLE-Flow ({args.preset}) beside anomalib PatchCore, {args.split} part",
        "command": command,
        "machine": f"{info['cpu']}, {info['logical_cores']} logical cores, {info['ram_gb']:.0f} GiB, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average at start {info['load_average_start']}",
        "machine_info": info,
        "data": data_desc,
        "split": args.split,
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "methods": methods,
        "notes": notes,
    }


def run_budget(args: argparse.Namespace, out: Path, started: dt.datetime, command: str) -> dict[str, Any]:
    """The preset at 1x, 2x and 4x its training steps on a few categories: quality against minutes."""
    categories = [c for c in args.budget_categories.split(",") if c]
    base = compose_config([f"experiment={args.preset}"], out / "probe")
    steps = base.training.steps
    if steps is None:
        msg = (
            f"--budget scales training.steps, but experiment={args.preset} trains by epochs; give a preset with steps."
        )
        raise ValueError(msg)
    common = [*_common(args), f"data.categories=[{','.join(categories)}]"]
    rows = []
    for factor in BUDGET_FACTORS:
        payload, wall = run_moleflow_row(
            [*common, f"training.steps={factor * steps}"], out / "runs" / f"steps_{factor}x"
        )
        final = payload["final"]["routed"]
        seconds = _task_seconds(payload)
        rows.append(
            {
                "factor": factor,
                "steps": factor * steps,
                "minutes": wall / 60,
                "minutes_per_task": sum(seconds.values()) / 60 / max(1, len(seconds)),
                "image_auroc": final["image_auroc"],
                "pixel_auroc": final["pixel_auroc"],
                "per_task": {
                    n: {k: r["routed"][k] for k in ("image_auroc", "pixel_auroc")}
                    for n, r in payload["per_task"].items()
                },
            }
        )
    lines = [
        f"# Quality against minutes: experiment={args.preset} at 1x, 2x, 4x its {steps} steps per task",
        "",
        f"- Command: `{command}`",
        f"- Categories: {', '.join(categories)} (conf/data/{args.data}.yaml), {args.split} part; "
        f"at most {args.max_train} training and {args.max_test} scored images per task.",
        f"- Machine: {machine_info(torch.device('cpu'))['cpu']}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| steps per task | minutes (run) | minutes per task | mean img AUROC | mean pix AUROC |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['steps']} ({r['factor']}x) | {r['minutes']:.1f} | {r['minutes_per_task']:.1f} | "
            f"{_fmt(r['image_auroc'])} | {_fmt(r['pixel_auroc'])} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"command": command, "started": started.isoformat(timespec="seconds"), "rows": rows}


def _fmt(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def _anomalib_version() -> str:
    import anomalib

    return anomalib.__version__


if __name__ == "__main__":
    main()
