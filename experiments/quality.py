"""Detection quality on real data, beside the field's standard baseline (``make quality``).

    python -m experiments.quality [--data real_sequence] [--max-train 200] [--max-test 200]
                                  [--preset quality_cpu] [--row LABEL=override,override ...]
                                  [--patchcore-ratio 0.1] [--skip-patchcore] [--out DIR]

On the same images, backbone, layers and resolution it runs:

- MoLE-Flow with the preset, continual over every task of the data (one run gives the routed and the
  oracle-routed scores);
- MoLE-Flow ``+ablation=complete_separated`` (one independent flow per task, same preset);
- any extra MoLE-Flow rows given with ``--row`` (e.g. a candidate switch);
- anomalib's ``Patchcore`` trained per task (coreset 10 %, its own scores and maps).

It writes DIR/quality.{md,csv,json} (image and pixel AUROC, AP, AUPRO at 30 % FPR, per task and mean,
routing accuracy, wall time) and keeps every MoLE-Flow run under DIR/runs/. Pixel means average the
tasks that have masks; the table says how many. Needs the Magnetic Tile clone under data/ (see README).
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
from experiments.comparison.patchcore import PatchCoreSettings, run_patchcore_task
from experiments.tables import quality_table as table
from moleflow.assembly.builders import build_datamodule
from moleflow.config.compose import compose_config
from moleflow.config.instantiation import to_dict
from moleflow.training.job import train_job
from moleflow.utils.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]

DESCRIPTIONS = {
    "moleflow": "MoLE-Flow with the preset, continual over the task sequence; scores routed by its own router",
    "oracle": "the same run's scores with the true task's expert (oracle routing)",
    "complete_separated": "MoLE-Flow +ablation=complete_separated: an independent flow per task (no sharing)",
    "patchcore": "anomalib's Patchcore (PatchcoreModel), one per task: memory bank of the task's training "
    "patches, greedy coreset, nearest-neighbour scores, its own image score and anomaly map",
}


def _per_task_from_run(payload: dict[str, Any], mode: str) -> dict[str, dict[str, Any]]:
    out = {}
    for name, row in payload["per_task"].items():
        entry = dict(row[mode])
        entry["routing_accuracy"] = row["routing_accuracy"] if mode == "routed" else None
        entry["diverged"] = row.get("diverged")  # None, or why: left out of the means
        out[name] = entry
    return out


def run_moleflow_row(label: str, overrides: list[str], out_dir: Path) -> tuple[dict[str, Any], float]:
    """One MoLE-Flow run (train(cfg) in this process); returns metrics.json's payload and wall seconds."""
    tic = time.perf_counter()
    payload = train_job(compose_config(overrides, out_dir))
    return payload, time.perf_counter() - tic


def run_patchcore(overrides: list[str], out_dir: Path, settings: PatchCoreSettings) -> tuple[dict[str, Any], float]:
    """anomalib PatchCore per task on the data and backbone of ``overrides``' config."""
    cfg = compose_config(overrides, out_dir)
    dm = build_datamodule(cfg.data)
    backbone = to_dict(cfg.model.backbone)
    tic = time.perf_counter()
    per_task = {}
    details = {}
    for t, name in enumerate(dm.task_names):
        result = run_patchcore_task(dm, t, backbone, settings, torch.device("cpu"))
        per_task[name] = {**result["metrics"], "routing_accuracy": None}
        details[name] = result
    return {"per_task": per_task, "details": details}, time.perf_counter() - tic


def _method(label: str, key: str, per_task: dict[str, dict[str, Any]], wall_s: float, **extra: Any) -> dict[str, Any]:
    clean = {
        t: {k: (v if not (isinstance(v, float) and not math.isfinite(v)) else None) for k, v in row.items()}
        for t, row in per_task.items()
    }
    return {
        "label": label,
        "key": key,
        "description": extra.pop("description", DESCRIPTIONS.get(key, "")),
        "per_task": clean,
        "mean": table.method_mean(clean),
        "wall_s": wall_s,
        **extra,
    }


def parse_row(text: str) -> tuple[str, list[str]]:
    """``LABEL=override,override`` -> (label, overrides)."""
    label, _, spec = text.partition("=")
    if not label or not spec:
        msg = f"--row must look like LABEL=key=value,key=value; got {text!r}."
        raise argparse.ArgumentTypeError(msg)
    return label, [o for o in spec.split(",") if o]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="real_sequence", help="data config group (conf/data/)")
    parser.add_argument("--max-train", type=int, default=200, help="training images per task (seeded subsample)")
    parser.add_argument("--max-test", type=int, default=200, help="test images per task (ratio kept)")
    parser.add_argument("--preset", default="quality_cpu", help="experiment preset of the MoLE-Flow rows")
    parser.add_argument("--row", action="append", type=parse_row, default=[], help="extra row LABEL=overrides")
    parser.add_argument("--no-separated", action="store_true", help="leave out the complete_separated row")
    parser.add_argument("--skip-patchcore", action="store_true")
    parser.add_argument("--patchcore-ratio", type=float, default=0.1, help="coreset share (anomalib default 0.1)")
    parser.add_argument("--patchcore-sampler", default="buffered", choices=("buffered", "anomalib"))
    parser.add_argument("--set", action="append", default=[], help="extra override for every row (key=value)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    keep_freed_memory()
    started = dt.datetime.now()
    out = args.out or ROOT / "logs" / "quality" / started.strftime("%Y-%m-%d_%H-%M-%S")
    common = [
        f"experiment={args.preset}",
        f"data={args.data}",
        f"data.max_train_per_task={args.max_train}",
        f"data.max_test_per_task={args.max_test}",
        "logger=csv",
        "report.figures=false",
        *args.set,
    ]
    rows = [("MoLE-Flow", "moleflow", [])]
    if not args.no_separated:
        rows.append(("complete separated", "complete_separated", ["+ablation=complete_separated"]))
    rows += [(label, "extra", extra) for label, extra in args.row]
    methods = []
    first_payload: dict[str, Any] | None = None
    for label, key, extra in rows:
        payload, wall = run_moleflow_row(label, [*common, *extra], out / "runs" / label.replace(" ", "_"))
        first_payload = first_payload or payload
        overrides = " ".join(extra) or "(preset only)"
        description = DESCRIPTIONS.get(key, f"MoLE-Flow with {overrides}")
        methods.append(
            _method(
                f"{label} (routed)",
                key,
                _per_task_from_run(payload, "routed"),
                wall,
                description=description,
                overrides=extra,
                run_dir=payload["run"]["output_dir"],
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
        "Rows (routed) and (oracle) of one MoLE-Flow label come from the same run; its wall time covers "
        "training and both evaluations of every task after every task (the continual protocol).",
        "Pixel means average the tasks with pixel masks (ELPV has image labels only: n/a).",
    ]
    if not args.skip_patchcore:
        settings = PatchCoreSettings(coreset_ratio=args.patchcore_ratio, sampler=args.patchcore_sampler)
        result, wall = run_patchcore(common, out / "patchcore", settings)
        methods.append(
            _method(
                "PatchCore per task",
                "patchcore",
                result["per_task"],
                wall,
                details=result["details"],
                settings=vars(settings),
            )
        )
        notes.append(
            f"PatchCore: anomalib {_anomalib_version()}, coreset ratio {args.patchcore_ratio}, sampler "
            f"{args.patchcore_sampler!r} (buffered = anomalib's greedy k-center with the same operations on "
            "preallocated buffers; it selects the same indices, tested in tests/unit/test_quality_patchcore.py)."
        )
    if first_payload is not None:
        ft = first_payload["forgetting"]["oracle"]
        notes.append(
            "Forgetting of the MoLE-Flow run under oracle routing (FM, image / pixel AUROC): "
            f"{_fmt(ft['image_auroc']['fm'])} / {_fmt(ft['pixel_auroc']['fm'])}."
        )
    data_desc = (
        f"conf/data/{args.data}.yaml, at most {args.max_train} training and {args.max_test} test images per task"
    )
    if first_payload is not None:
        data_desc += (
            f"; tasks {first_payload['tasks']}; backbone {first_payload['config']['model']['backbone']['name']} "
        )
        config = first_payload["config"]
        data_desc += f"{config['model']['backbone']['layers']} at {config['data']['image_size']} px"
    info = machine_info(torch.device("cpu"))
    result = {
        "title": f"MoLE-Flow ({args.preset}) beside anomalib PatchCore",
        "command": "python -m experiments.quality "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": f"{info['cpu']}, {info['logical_cores']} logical cores, {info['ram_gb']:.0f} GiB, "
        f"torch {torch.__version__}, load average at start {info['load_average_start']}",
        "machine_info": info,
        "data": data_desc,
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().isoformat(timespec="seconds"),
        "methods": methods,
        "notes": notes,
    }
    paths = table.write(result, out)
    print(paths["md"].read_text())
    print(f"Written: {', '.join(str(p) for p in paths.values())}")
    return result


def _fmt(value: Any) -> str:
    return f"{100 * value:.2f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def _anomalib_version() -> str:
    import anomalib

    return anomalib.__version__


if __name__ == "__main__":
    main()
