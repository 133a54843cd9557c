"""The performance benchmark (experiments/bench.py) reports every section and every target of issue 8.

The fast test runs every section at tiny sizes (the figures mean nothing, the structure is what is
checked); the ``bench``-marked test runs the real command line in --quick mode.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import bench
from experiments.benchmark.flop import expected_parameter_counts, flow_flop_per_patch
from experiments.benchmark.inference import STAGES
from experiments.benchmark.settings import smoke_settings
from moleflow.config.flow import MoLEFlowConfig

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (
    "meta",
    "machine",
    "ceiling",
    "flow",
    "inference",
    "end_to_end",
    "memory",
    "pixel_metrics",
    "estimate",
    "targets",
)
TARGET_WORDS = (
    "training step",
    "inference pass",
    "batches of",
    "one batch of",
    "camera frame",
    "PNG file",
    "split by task",
    "merged experts",
    "pixel AUROC/AP",
    "backbone runs once",
)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _check_report(out: Path) -> dict:
    data = json.loads((out / "bench.json").read_text())
    md = (out / "bench.md").read_text()
    assert all(section in data for section in SECTIONS)
    assert len(data["targets"]) == len(TARGET_WORDS)
    for word, target in zip(TARGET_WORDS, data["targets"], strict=True):
        assert word in target["name"]
        assert isinstance(target["held"], bool)
        assert _is_number(target["measured"])
        assert target["name"] in md
        assert ("**held**" in md) or ("**NOT held**" in md)
    assert _is_number(data["ceiling"]["ceiling_gflops"]) and data["ceiling"]["ceiling_gflops"] > 0
    for key in ("train_step", "inference", "inference_unmerged"):
        assert _is_number(data["flow"][key]["ceiling_share"])
    for label in ("batch", "single", "single_frame"):
        stages = data["inference"][label]["stages"]
        assert set(stages) == set(STAGES)
        assert abs(sum(v["share"] for v in stages.values()) - 1) < 1e-9
    stream = data["inference"]["stream"]
    assert _is_number(stream["other_share"]) and stream["images"] == stream["batches"] * stream["batch_size"]
    for mode in ("overlapped", "in_turn"):
        assert set(stream[mode]["ms_per_image"]) == set(STAGES[1:])
    assert _is_number(stream["overlapped_over_in_turn_time"])
    step = data["flow"]["train_step_flop"]
    assert step["unfused_formula"] > step["total"] == pytest.approx(1e9 * data["flow"]["train_step"]["gflop"])
    assert data["memory"]["matches_shapes"]
    assert data["memory"]["checkpoint"]["bytes"] > 0
    assert _is_number(data["estimate"]["total_hours"])
    for heading in ("## Machine", "## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6.", "## 7. Estimated cost"):
        assert heading in md
    return data


def test_bench_smoke_every_section_and_target(tmp_path: Path) -> None:
    bench.run_benchmark(smoke_settings(), tmp_path, "pytest smoke")
    data = _check_report(tmp_path)
    assert "not representative" in (tmp_path / "bench.md").read_text()
    e2e = data["end_to_end"]
    assert e2e["cache"]["backbone_images"] == e2e["expected_backbone_images"]["cache"]
    assert e2e["reextract"]["backbone_images"] == e2e["expected_backbone_images"]["reextract"]
    assert e2e["losses_bit_identical"]
    assert data["inference"]["routed_mixed"]["flow_passes_split"] == data["inference"]["routed_mixed"]["distinct_tasks"]
    assert data["inference"]["merged_vs_unmerged"]["within_tolerance"]
    assert data["inference"]["exported_vs_eager"]["same_tasks"]


def test_flop_and_parameter_formulas_match_the_design() -> None:
    """MAIN shapes: about 18 MFLOP per patch forward (issue 8) and the counts of docs/method.md section 9."""
    cfg = MoLEFlowConfig()
    merged = flow_flop_per_patch(cfg, merged=True)["total"]
    assert merged == 6 * (2 * (768 * 768 + 3 * 768 * 384) + 2 * 25 * 384) + 2 * 9 * 768
    assert 17e6 < merged < 19e6
    lora = flow_flop_per_patch(cfg, merged=False)["lora"]
    assert lora == 6 * 2 * 64 * ((768 + 768) + 3 * (768 + 384))
    counts = expected_parameter_counts(cfg, 15)
    assert counts["per_task"] == 1_932_288
    assert round(counts["shared"] / 1e6, 2) == 8.93  # 8.92 M base flow + mixer and context convs
    assert expected_parameter_counts(MoLEFlowConfig(lora_rank=16), 1)["per_task"] == 494_592


@pytest.mark.bench
def test_bench_quick_command_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "experiments.bench", "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    data = _check_report(tmp_path)
    assert data["meta"]["mode"] == "quick"
    assert "quick mode: not representative" in done.stdout
