"""Packaging hook: the top-level ``conf/`` goes into the wheel as package data ``moleflow/conf``.

The configs stay at the repository's top level (the layout of the design card); the installed commands
(``moleflow-train`` and the others) read them from inside the package, so they run from any folder. Everything
else about the package is in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildWithConfigs(build_py):
    """build_py, then a copy of conf/ (YAML files only) into the built package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "moleflow" / "conf"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(CONF, target, ignore=lambda folder, names: [n for n in names if n.startswith(".")])


setup(cmdclass={"build_py": BuildWithConfigs})
