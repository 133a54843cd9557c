"""The docs in docs/ are the repository's own: every config key documented, nothing pointing outside it."""

from __future__ import annotations

import dataclasses
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from tests.helpers import CONF_DIR, compose_config

ROOT = CONF_DIR.parent
DOCS = ROOT / "docs"
CONFIG_DOC = DOCS / "configuration.md"

# Apps and the group options whose keys the configuration page must cover (each option composed once).
GROUPS = (
    "data",
    "trainer",
    "callbacks",
    "logger",
    "model/backbone",
    "model/optimizer",
    "model/scheduler",
    "experiment",
    "ablation",
)
OPAQUE = {"table_rows"}  # free-form mappings, documented as one key


def _flat(node: object, prefix: str = "") -> set[str]:
    """Dotted leaf keys; lists are leaves, empty mappings have no keys (``logger=none``)."""
    if isinstance(node, dict) and prefix[:-1] not in OPAQUE:
        return {key for k, v in node.items() for key in _flat(v, f"{prefix}{k}.")}
    return {prefix[:-1]}


def _keys(cfg) -> set[str]:
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    return _flat(data)


def _documented() -> dict[str, set[str]]:
    """Keys in the first column of each app's tables: {config name: keys} from the '## ...conf/X.yaml' sections."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in CONFIG_DOC.read_text().splitlines():
        heading = re.match(r"^## .*`conf/(\w+)\.yaml`", line)
        if heading:
            current = sections.setdefault(heading.group(1), set())
        elif line.startswith("## "):
            current = None
        key = re.match(r"^\| `([^`]+)` \|", line)
        if key and current is not None:
            current.add(key.group(1))
    return sections


def _option_overrides() -> list[list[str]]:
    runs: list[list[str]] = [[]]
    for group in GROUPS:
        prefix = "+" if group == "ablation" else ""
        for option in sorted((CONF_DIR / group).glob("*.yaml")):
            runs.append([f"{prefix}{group}={option.stem}"])
    return runs


def test_every_training_key_is_documented_and_every_documented_key_exists(tmp_path: Path) -> None:
    default = _keys(compose_config([], tmp_path))
    seen: set[str] = set()
    for overrides in _option_overrides():
        seen |= _keys(compose_config(overrides, tmp_path))
    documented = _documented()["train"]
    assert sorted(default - documented) == [], "keys of conf/train.yaml missing from docs/configuration.md"
    assert sorted(seen - documented) == [], "keys of a group option missing from docs/configuration.md"
    assert sorted(documented - seen) == [], "docs/configuration.md documents keys no config has"


def _schema_defaults(schema: type, prefix: str = "") -> dict[str, object]:
    """{dotted key: default} of every scalar field of the schema (moleflow.config.schema)."""
    out: dict[str, object] = {}
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out.update(_schema_defaults(type(default), f"{prefix}{f.name}."))
        elif default is not None or f.type not in ("Any", Any):
            out[f"{prefix}{f.name}"] = default
    return out


def _documented_defaults() -> dict[str, str]:
    """{key: default column text} of the training tables."""
    out, current = {}, False
    for line in CONFIG_DOC.read_text().splitlines():
        if line.startswith("## "):
            current = "`conf/train.yaml`" in line
        row = re.match(r"^\| `([^`]+)` \| ([^|]*) \|", line)
        if row and current:
            out[row.group(1)] = row.group(2).strip()
    return out


def _same(documented: str, default: object) -> bool:
    text = documented.strip("`")
    if default is None or isinstance(default, bool):
        return text == {None: "null", True: "true", False: "false"}[default]
    if isinstance(default, int | float):
        try:
            return float(text) == float(default)
        except ValueError:
            return False
    return text == str(default)


def test_documented_defaults_are_the_schemas() -> None:
    """docs/configuration.md's default column says what the schema declares, for every schema key."""
    from moleflow.config.checks import STUDY_KNOBS
    from moleflow.config.schema import JobConfig

    schema = _schema_defaults(JobConfig)
    documented = _documented_defaults()
    copies = set(STUDY_KNOBS.values())  # documented as `${knob}`
    assert len(schema) > 40
    wrong = {
        k: (documented.get(k), v) for k, v in schema.items() if k not in copies and not _same(documented.get(k, "?"), v)
    }
    assert wrong == {}, "docs/configuration.md default != schema default: {key: (doc, schema)}"


@pytest.mark.parametrize("app", ["eval", "predict"])
def test_every_eval_and_predict_key_is_documented(app: str) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        keys = _keys(compose(app))
    GlobalHydra.instance().clear()
    assert keys == _documented()[app]


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = out.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the usual outputs
        skip = {".git", ".venv", "logs", "data", "outputs", "__pycache__"}
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.parts)]
    return [ROOT / n for n in names if (ROOT / n).is_file()]


# Written in pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "shared/" + "design", "seed_" + "experiments", "/wo" + "rk/"]))


def test_nothing_points_outside_the_repository() -> None:
    hits = []
    for path in _tracked_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1)
                 if OUTSIDE.search(line)]  # fmt: skip
    assert hits == []


def test_every_docs_path_mentioned_exists() -> None:
    missing = []
    for path in _tracked_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        missing += [f"{path.relative_to(ROOT)}: {m}" for m in re.findall(r"docs/[\w.-]+\.md", text)
                    if not (ROOT / m).is_file()]  # fmt: skip
    assert missing == []


def test_study_page_lists_every_table_and_row() -> None:
    """docs/study.md names every table (with its command) and every named row with its label."""
    from experiments.tables.specs import TABLES

    text = (DOCS / "study.md").read_text()
    for table in TABLES.values():
        assert f"`{table.name}`" in text or f"experiment={table.name}" in text, table.name
        if table.source == "train":
            assert f"experiment={table.name}" in text, f"no command for {table.name}"
        if table.row_by != "ablation":
            continue
        heading = "## " + table.title.split(" (")[0]
        assert heading in text, heading
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        for row in table.rows:
            line = next((ln for ln in section.splitlines() if ln.startswith(f"| `{row.key}` | {row.label} |")), None)
            assert line is not None, f"{table.name}: row {row.key} ({row.label})"
            cells = [c.strip() for c in line.split("|")]
            for metric, value in row.ref.items():  # the reference figures, as the row's file types them
                assert f"{value:.2f}" in cells or f"{value:.1f}" in cells, f"{table.name} {row.key} {metric}"
