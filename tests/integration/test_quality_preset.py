"""The CPU quality preset on MVTec-layout data, and `make quality`'s table, on generated images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moleflow.config.checks import validate_config
from tests.helpers import compose_config

pytest.importorskip("anomalib")

QUICK = [
    "training.steps=2",
    "data.image_size=64",
    "model.flow.router_grid=4",  # the 64 px images give an 8 x 8 patch grid, smaller than the preset's 14 x 14 cells
    "data.num_workers=0",
    "report.figures=false",
    "logger=none",
]


def test_quality_preset_needs_no_override_beyond_the_data(tmp_path: Path, synthetic_root: Path) -> None:
    from train import train

    data = ["experiment=quality_cpu", "data=mvtec", f"data.root={synthetic_root}", "data.categories=[stripes,dots]"]
    cfg = compose_config(data, tmp_path / "composed")
    validate_config(cfg)  # as a user would run it: nothing else to set
    flow = cfg.model.flow
    assert cfg.model.backbone.name == "efficientnet_lite0" and cfg.model.backbone.embedding == "pool_concat"
    assert (flow.embed_dim, flow.standardize, flow.adapter) == (152, "position", "none")
    assert flow.standardize_floor == 0.3 and flow.standardize_floor_noise  # near-black fix (docs/quality.md)
    assert cfg.training.steps == 300
    assert cfg.training.photometric_copies == 1  # a frame that changes between training and test (docs/quality.md)
    assert (cfg.dia_blocks, cfg.model.scheduler.adapt_lr_scale) == (2, 10.0)  # docs/quality.md

    payload = train(compose_config([*data, *QUICK], tmp_path / "run"))  # the same, shortened to 2 steps a task
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert payload["status"] == "finished" and metrics["tasks"] == ["stripes", "dots"]
    assert metrics["forgetting"]["oracle"]["image_auroc"]["fm"] == 0.0  # continual: the first task is untouched
    assert all(metrics["training"][t]["steps"] == 2 for t in ("stripes", "dots"))


def test_quality_script_writes_every_row_from_its_runs(tmp_path: Path, synthetic_root: Path) -> None:
    from experiments import quality

    out = tmp_path / "quality"
    sets = [f"data.root={synthetic_root}", "data.generate=null", "data.categories=[stripes,dots]", *QUICK]
    argv = ["--data", "generated", "--max-train", "8", "--max-test", "8", "--patchcore-ratio", "0.05"]
    argv += ["--row", "rank4=lora_rank=4", "--out", str(out), "--separated", "--bootstrap", "50"]
    argv += ["--patchcore-cache", str(tmp_path / "cache"), "--split", "validation", "--validation-share", "0.5"]
    for item in sets:
        argv += ["--set", item]
    result = quality.main(argv)

    labels = [m["label"] for m in result["methods"]]
    assert labels == [
        "MoLE-Flow (routed)",
        "MoLE-Flow (oracle)",
        "complete separated (routed)",
        "complete separated (oracle)",
        "rank4 (routed)",
        "rank4 (oracle)",
        "PatchCore per task",
    ]
    for suffix in ("md", "csv", "json"):
        assert (out / f"quality.{suffix}").is_file()
    # the table's MoLE-Flow numbers are the run's own metrics.json numbers, not recomputed elsewhere
    run = json.loads((Path(result["methods"][0]["run_dir"]) / "metrics.json").read_text())
    for task in ("stripes", "dots"):
        assert result["methods"][0]["per_task"][task]["image_auroc"] == run["per_task"][task]["routed"]["image_auroc"]
        assert result["methods"][1]["per_task"][task]["pixel_aupro"] == run["per_task"][task]["oracle"]["pixel_aupro"]
    patchcore = result["methods"][-1]
    assert all(0.0 <= patchcore["per_task"][t]["pixel_aupro"] <= 1.0 for t in ("stripes", "dots"))
    text = (out / "quality.md").read_text()
    assert "coreset ratio 0.05" in text and "0 of 2 tasks read from its cache" in text
    # every scored image comes from the validation part; intervals, the comparison and the side-by-side maps
    assert run["config"]["data"]["evaluate_on"] == "validation" and result["split"] == "validation"
    lo, hi = result["methods"][0]["per_task"]["stripes"]["ci"]["image_auroc"]
    assert lo <= result["methods"][0]["per_task"]["stripes"]["image_auroc"] <= hi
    assert result["methods"][0]["per_task"]["stripes"]["time_s"] > 0
    checks = result["against_patchcore"]["MoLE-Flow (routed)"]["checks"]
    assert set(checks) == {"mean_image_at_or_above", "mean_pixel_at_or_above", "no_category_more_than_5_below"}
    assert "## Against PatchCore" in text and sorted(p.name for p in (out / "overlays").glob("*.png")) == [
        "dots.png",
        "stripes.png",
    ]
    # PatchCore runs once per category and part: a second call reads its cache, with the same numbers
    again_argv = ["--data", "generated", "--max-train", "8", "--max-test", "8", "--patchcore-ratio", "0.05"]
    again_argv += ["--out", str(tmp_path / "again"), "--bootstrap", "0", "--patchcore-cache", str(tmp_path / "cache")]
    again_argv += ["--split", "validation", "--validation-share", "0.5"]
    for item in sets:
        again_argv += ["--set", item]
    again = quality.main(again_argv)
    for task in ("stripes", "dots"):
        for key in ("image_auroc", "pixel_auroc", "image_ap", "pixel_ap", "pixel_aupro"):
            assert again["methods"][-1]["per_task"][task][key] == patchcore["per_task"][task][key]
    assert "2 of 2 tasks read from its cache" in (tmp_path / "again" / "quality.md").read_text()
    cached_row = again["methods"][-1]  # its minutes are those measured when the cache was written
    assert cached_row["wall_s"] == pytest.approx(sum(r["time_s"] for r in patchcore["per_task"].values()))
