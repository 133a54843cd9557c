"""Routing of defect-free and defective test images, router beside router, without training a flow.

    python -m experiments.routing_study [--preset demo] [--data elpv] [--max-train 200] [--max-test 200]
                                        [--router prototype] [--router positional:grid=14,keep=0.1,global_vote=1]
                                        [--router nearest:neighbors=1]
                                        [--holdout 0.1] [--cache DIR] [--out DIR] [-o OVERRIDE ...]
    python -m experiments.routing_study --runs RUN_DIR [RUN_DIR ...]    (the routing of finished runs, side by side)

Routers need only the frozen backbone's patch features of each task's training images (the flow is never
involved), so this measures routing exactly as a run of the preset would (same data subset, backbone,
embedding and resolution), in minutes instead of a full run. For every router it fits the tasks in order,
routes every test image over all tasks, and reports the routing accuracy per task for defect-free and
defective images, per defect type, the confusion matrices and the routing time per image.

Unknown category, as training with ``training.calibration_share`` makes it: each router is fitted on all but a
seeded ``--holdout`` share of each task's training images, each task's unknown-category threshold is fitted
on its held-out images (rate 1 %), and the share of test images flagged "unknown" is reported per label. A
never-trained category is simulated by leaving each task out in turn: the router of the other tasks (same
thresholds) must flag that task's test images. Results go to DIR/routing.{json,md}; features are cached in
--cache (reused by the next call with the same settings).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from moleflow.assembly.builders import build_datamodule, build_extractor
from moleflow.config.compose import compose_config
from moleflow.config.instantiation import to_dict
from moleflow.evaluation.continual_metrics import routing_confusion
from moleflow.evaluation.evaluate import router_inputs
from moleflow.models.router import build_router
from moleflow.thresholds.fitting import outside_own_route, tail_threshold
from moleflow.thresholds.held_out import holdout_split
from moleflow.training.feature_cache import FeatureCache

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_ROUTERS = ("prototype", "positional")


def parse_router(spec: str, defaults: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``positional:grid=14,keep=0.1,global_vote=1`` -> ("positional", {grid: 14, keep: 0.1, ...defaults})."""
    kind, _, rest = spec.partition(":")
    options = dict(defaults)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key in ("grid", "neighbors"):
            options[key] = int(value)
        elif key == "global_vote":
            options[key] = value.lower() in ("1", "true", "yes")
        else:
            options[key] = float(value)
    return kind, options


def feature_cache(cfg: Any, cache_dir: Path | None) -> FeatureCache:
    """The backbone's feature cache for the study's config (on disk in ``cache_dir``, else in memory)."""
    extractor = build_extractor(cfg.model.backbone, int(cfg.model.flow.embed_dim))
    return FeatureCache(
        extractor,
        torch.device("cpu"),
        mode="disk" if cache_dir else "memory",
        directory=cache_dir,
        fingerprint={
            "backbone": to_dict(cfg.model.backbone),
            "d": int(cfg.model.flow.embed_dim),
            "size": int(cfg.data.image_size),
            "data": str(cfg.data.get("name")),
            "max_train": cfg.data.get("max_train_per_task"),
            "max_test": cfg.data.get("max_test_per_task"),
            "categories": list(cfg.data.categories) if cfg.data.get("categories") else None,
        },
    )


def study(cfg: Any, specs: list[str], cache_dir: Path | None, holdout: float = 0.1) -> dict[str, Any]:
    torch.manual_seed(int(cfg.seed))
    dm = build_datamodule(cfg.data)
    cache = feature_cache(cfg, cache_dir)
    names = dm.task_names
    train, test = [], []
    for t, name in enumerate(names):
        dm.set_task(t)
        train.append(cache.get(f"{t:02d}_{name}/train", dm.train_dataloader, with_masks=False))
        test.append(cache.get(f"{t:02d}_{name}/test", lambda t=t: dm.test_dataloader_for(t), with_masks=False))
    flow = cfg.model.flow
    defaults = {
        "ridge": float(flow.router_ridge),
        "grid": int(flow.router_grid),
        "keep": float(flow.router_keep),
        "variance_floor": float(flow.router_variance_floor),
        "global_vote": bool(flow.router_global_vote),
        "neighbors": int(flow.get("router_neighbors", 1)),
    }
    results: dict[str, Any] = {
        "tasks": names,
        "train_images": [len(s) for s in train],
        "test_images": {
            n: {"normal": int((s.labels == 0).sum()), "defective": int((s.labels == 1).sum())}
            for n, s in zip(names, test, strict=True)
        },
        "routers": {},
    }
    for spec in specs:
        kind, options = parse_router(spec, defaults)
        own = {"prototype": ("ridge",), "nearest": ("neighbors",)}.get(kind)  # positional: all but neighbors
        options = {k: v for k, v in options.items() if (k in own if own else k != "neighbors")}
        router = build_router(kind, int(flow.embed_dim), **options)
        held_inputs, kept_inputs = [], []
        for t, feats in enumerate(train):
            inputs = router_inputs(router, feats)
            kept, held = holdout_split(len(inputs), holdout, int(cfg.seed) + 1000 * (t + 1))  # as training does
            router.fit_task(t, inputs[kept])
            held_inputs.append(inputs[held])
            kept_inputs.append(inputs[kept])
        thresholds = torch.tensor(
            [
                tail_threshold(router.distances(x, t + 1)[:, t].numpy(), 0.01, float(router.floors(t + 1)[t]))
                for t, x in enumerate(held_inputs)
            ],
            dtype=torch.float64,
        )
        per_task: dict[str, Any] = {}
        true, pred, labels = [], [], []
        tic = time.perf_counter()
        for t, (name, feats) in enumerate(zip(names, test, strict=True)):
            inputs = router_inputs(router, feats)
            dists, routed = router.decide(inputs, len(names))
            unknown = outside_own_route(dists, thresholds, routed)  # the rule predict and training use
            others = [k for k in range(len(names)) if k != t]  # task t never trained: flagged by the others?
            if others:  # a router fitted on the other tasks only (the vote must not see task t either)
                without = router.empty_copy()
                for i, k in enumerate(others):
                    without.fit_task(i, kept_inputs[k])
                d_without, routed_without = without.decide(inputs, len(others))
                never = outside_own_route(d_without, thresholds[others], routed_without)
            else:
                never = unknown
            true.append(torch.full_like(routed, t))
            pred.append(routed)
            labels.append(feats.labels)
            kinds = [s.defect_type for s in dm.test_dataset(t).samples]
            row: dict[str, Any] = {}
            for label, key in ((0, "normal"), (1, "defective")):
                keep = feats.labels == label
                row[key] = float((routed[keep] == t).double().mean()) if keep.any() else None
                row[f"unknown_{key}"] = float(unknown[keep].double().mean()) if keep.any() else None
                # routed to another task and not flagged unknown: the case predict cannot warn about
                row[f"silent_{key}"] = int(((routed != t) & ~unknown)[keep].sum())
            row["flagged_if_never_trained"] = float(never.double().mean())
            row["per_defect_type"] = {
                k: float((routed[torch.tensor([d == k for d in kinds])] == t).double().mean())
                for k in dict.fromkeys(kinds)
            }
            per_task[name] = row
        seconds = time.perf_counter() - tic
        true_t, pred_t, lab_t = torch.cat(true), torch.cat(pred), torch.cat(labels)
        results["routers"][spec] = {
            "kind": kind,
            "options": options,
            "per_task": per_task,
            "normal": float((pred_t[lab_t == 0] == true_t[lab_t == 0]).double().mean()),
            "defective": float((pred_t[lab_t == 1] == true_t[lab_t == 1]).double().mean()),
            "confusion": {
                key: routing_confusion(
                    true_t[lab_t == label].numpy(), pred_t[lab_t == label].numpy(), len(names)
                ).tolist()
                for label, key in ((0, "normal"), (1, "defective"))
            },
            "route_ms_per_image": 1000 * seconds / len(true_t),
            "holdout": holdout,
            "route_thresholds": thresholds.tolist(),
        }
    return results


def markdown(results: dict[str, Any], command: str) -> str:
    names = results["tasks"]
    lines = [f"`{command}`", "", "Routing accuracy (%) of the test images, defect-free / defective:", ""]
    lines.append("| router | " + " | ".join(f"{n} nrm | {n} def" for n in names) + " | all nrm | all def | ms/img |")
    lines.append("|---" * (2 * len(names) + 4) + "|")
    for spec, r in results["routers"].items():
        cells = []
        for n in names:
            for key in ("normal", "defective"):
                v = r["per_task"][n][key]
                cells.append("n/a" if v is None else f"{100 * v:.1f}")
        lines.append(
            f"| `{spec}` | " + " | ".join(cells) + f" | {100 * r['normal']:.1f} | {100 * r['defective']:.1f} | "
            f"{r['route_ms_per_image']:.2f} |"
        )
    counts = ", ".join(
        f"{n}: {c['normal']} normal / {c['defective']} defective" for n, c in results["test_images"].items()
    )
    lines += ["", f"Test images: {counts}. Training images per task: {results['train_images']}.", ""]
    lines.append(
        "Unknown category (%): test images flagged with thresholds fitted on the held-out training images "
        "(defect-free / defective), and images of each task flagged by a router that never trained it:"
    )
    lines.append("")
    lines.append("| router | " + " | ".join(f"{n} nrm | {n} def | {n} never trained" for n in names) + " |")
    lines.append("|---" * (3 * len(names) + 1) + "|")
    for spec, r in results["routers"].items():
        cells = []
        for n in names:
            row = r["per_task"][n]
            for key in ("unknown_normal", "unknown_defective", "flagged_if_never_trained"):
                cells.append("n/a" if row[key] is None else f"{100 * row[key]:.1f}")
        lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    lines += ["", "Test images routed to another task and not flagged unknown (count, defect-free / defective):", ""]
    lines.append("| router | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    for spec, r in results["routers"].items():
        cells = [f"{r['per_task'][n]['silent_normal']} / {r['per_task'][n]['silent_defective']}" for n in names]
        lines.append(f"| `{spec}` | " + " | ".join(cells) + " |")
    for spec, r in results["routers"].items():
        off = [n for n, thr in zip(names, r["route_thresholds"], strict=True) if thr == float("inf")]
        if off:
            lines.append(f"\n`{spec}`: unknown-category threshold off (under 3 held-out images) for {off}.")
    return "\n".join(lines) + "\n"


def from_runs(run_dirs: list[Path]) -> str:
    """The routing of finished runs (e.g. ``experiment=similar_routing``'s multirun), one row per run."""
    lines = ["| run | router | task | Rt Acc | Rt Nrm | Rt Def | FPR | recall |", "|---" * 8 + "|"]
    for run in run_dirs:
        m = json.loads((run / "metrics.json").read_text())
        flow = m["config"]["model"]["flow"]
        router = flow.get("router", "prototype")
        if router == "positional":
            vote = ", vote" if flow.get("router_global_vote") else ""
            router = f"positional {flow.get('router_grid')}/{flow.get('router_keep')}{vote}"
        verdicts = (m.get("thresholds") or {}).get("per_task", {})

        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.1f}"

        for name, row in m["per_task"].items():
            v = verdicts.get(name, {})
            lines.append(
                f"| {run.name} | {router} | {name} | {pct(row['routing_accuracy'])} | "
                f"{pct(row.get('routing_accuracy_normal'))} | {pct(row.get('routing_accuracy_defective'))} | "
                f"{pct(v.get('fpr'))} | {pct(v.get('recall'))} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="conf/experiment/<preset>.yaml (backbone, embedding, D)")
    parser.add_argument("--data", default="elpv", help="conf/data/<data>.yaml")
    parser.add_argument("--max-train", type=int, default=200, help="training images per task (0: all)")
    parser.add_argument("--max-test", type=int, default=200, help="test images per task (0: all)")
    parser.add_argument("--router", action="append", help="kind[:key=value,...]; repeat (default: both kinds)")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache folder (reused across calls)")
    parser.add_argument("--out", type=Path, default=ROOT / "logs" / "routing_study")
    parser.add_argument("-o", "--override", action="append", default=[], help="extra Hydra override")
    parser.add_argument("--holdout", type=float, default=0.1, help="share of training images for the thresholds")
    parser.add_argument("--runs", type=Path, nargs="+", help="finished run folders: print their routing instead")
    args = parser.parse_args(argv)
    if args.runs:
        print(from_runs(args.runs))
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = [
        f"experiment={args.preset}",
        f"data={args.data}",
        f"data.max_train_per_task={args.max_train if args.max_train > 0 else 'null'}",
        f"data.max_test_per_task={args.max_test if args.max_test > 0 else 'null'}",
        "data.num_workers=0",
        "logger=none",
        *args.override,
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = compose_config(overrides, args.out)
    results = study(cfg, args.router or list(DEFAULT_ROUTERS), args.cache, args.holdout)
    command = "python -m experiments.routing_study " + " ".join(sys.argv[1:] if argv is None else argv)
    results["command"] = command
    results["overrides"] = overrides
    (args.out / "routing.json").write_text(json.dumps(results, indent=2))
    text = markdown(results, command)
    (args.out / "routing.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
