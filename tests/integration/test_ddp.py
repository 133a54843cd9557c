"""trainer=ddp: two CPU processes (gloo) train each task; the loop, cache, router and outputs stay in one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import CONF_DIR

ROOT = CONF_DIR.parent
TOLERANCE = 0.02  # metrics of the 2-process run vs the single-process run (different shuffles, same global batch)


def _run(tmp_path, name: str, extra: list[str]) -> dict:
    out = tmp_path / name
    cmd = [
        sys.executable, "src/train.py", "experiment=generated_quick", "logger=none", "trainer.accelerator=cpu",
        "training.epochs=2", "ncl=2", "model.flow.embed_dim=32", "model.flow.hidden=32", "lora_rank=4",
        "data.categories=[stripes,dots]", f"hydra.run.dir={out}", f"paths.data_dir={tmp_path / 'data'}", *extra,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.slow  # two spawned processes per task: about 1-2 minutes on 2 cores
def test_two_process_ddp_matches_single_process(tmp_path) -> None:
    single = _run(tmp_path, "single", [])
    ddp = _run(tmp_path, "ddp", ["trainer=ddp", "trainer.devices=2"])
    assert ddp["status"] == "finished"
    assert ddp["routing"]["confusion"] == single["routing"]["confusion"]
    for metric, value in single["final"]["routed"].items():
        assert abs(ddp["final"]["routed"][metric] - value) <= TOLERANCE, metric
    # every task trained (the counters come back from the workers) and nothing diverged
    assert all(n > 0 for n in ddp["health"]["attempted_batches"].values())
    assert ddp["health"]["diverged"] == {}
    # one writer: exactly one metrics.json and one set of checkpoints
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == [
        "last.ckpt", "task_00_stripes.ckpt", "task_01_dots.ckpt",
    ]  # fmt: skip
