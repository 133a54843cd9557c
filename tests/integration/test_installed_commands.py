"""The installed package: a wheel holds the configs, and its commands compose MAIN from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = out.glob("moleflow-*.whl")
    return found


def test_the_wheel_holds_every_config_and_the_commands(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    configs = {str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml")}
    packaged = {n.removeprefix("moleflow/") for n in names if n.startswith("moleflow/conf/")}
    assert configs == packaged
    for command in ("moleflow", "moleflow-train", "moleflow-predict", "moleflow-eval"):
        assert f"{command} = moleflow.cli:" in entry_points


def test_the_installed_command_composes_main_from_any_folder(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)]
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    elsewhere = tmp_path / "a_line_pc"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}  # the installed copy only, not this clone's src/
    probe = "import moleflow.cli as c; print(c.CONF_DIR)"
    where = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert where.stdout.strip() == str(target / "moleflow" / "conf"), where.stderr[-2000:]
    done = subprocess.run(
        [sys.executable, "-m", "moleflow", "train", "+ablation=main", "--cfg", "job", "--resolve"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    job = done.stdout
    for line in ("ncl: 6", "lora_rank: 64", "name: wide_resnet50_2", "ablation_name: main"):
        assert line in job, line
    assert "embed_dim: 768" in job and "router: prototype" in job
