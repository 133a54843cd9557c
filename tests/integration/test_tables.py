"""Results tables: aggregation over seeds, deltas, skipping, footnotes and reference columns.

The fake runs are copies of ONE real tiny run's metrics.json with overrides and metric values
changed, so the file structure is the trainer's own; the numbers are chosen so that means, sample
stds and deltas can be worked out by hand.
"""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from experiments.tables.__main__ import build_table, collect_runs, main
from experiments.tables.specs import ABLATION_DIR, METRICS, TABLES
from moleflow.config.ablation_rows import read_ablation_rows
from moleflow.config.checks import STUDY_KNOBS

ROOT = Path(__file__).resolve().parents[2]
ABLATION_SETTINGS = {row.name: row.sets for rows in read_ablation_rows(ABLATION_DIR).values() for row in rows}
COLLAPSE = "mean image AUROC 0.512 is near chance: the flow may have collapsed"


@pytest.fixture(scope="module")
def real_metrics(tiny_run) -> dict[str, Any]:
    _, out, _ = tiny_run
    return json.loads((out / "metrics.json").read_text())


def fake_run(
    base: dict[str, Any],
    directory: Path,
    table: str,
    overrides: list[str],
    seed: int,
    img_auc: float,
    pix_ap: float | None,
    status: str = "finished",
    warnings: list[str] | None = None,
    config: dict[str, Any] | None = None,
) -> Path:
    """A copy of the real metrics.json as a run of ``table`` with the given overrides and figures.

    The recorded config is what such a run records: the ablation file's settings applied, and every study
    knob in ``config`` also in the derived copy the model reads (``ncl`` -> ``model.flow.ncl``).
    """
    data = copy.deepcopy(base)
    data["status"] = status
    data["run"]["overrides"] = [f"experiment={table}", *overrides, f"seed={seed}"]
    ablation = next((o.split("=", 1)[1] for o in overrides if o.startswith("+ablation=")), "main")
    settings = dict(ABLATION_SETTINGS.get(ablation, {}))
    settings.update(config or {})
    data["config"].update({"task_name": table, "group": table, "seed": seed, "ablation_name": ablation})
    for key, value in settings.items():
        paths = [key] + ([STUDY_KNOBS[key]] if key in STUDY_KNOBS else [])
        for path in paths:
            *parents, leaf = path.split(".")
            node = data["config"]
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    data["final"]["routed"].update({"image_auroc": img_auc, "pixel_ap": pix_ap})
    data["routing"]["accuracy"] = 1.0
    data["warnings"] = list(warnings or [])
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps(data))
    return directory


def cell(result, label: str, column: str) -> str:
    return result.row(label).cells[result.header.index(column)]


@pytest.fixture()
def table1_dir(real_metrics, tmp_path: Path) -> Path:
    """Table 1 multirun: MAIN, w/o scale context, w/o tail loss with two seeds each, plus one unfinished job."""
    multirun = tmp_path / "multirun"
    t = "table1_core_ablation"
    figures = {  # ablation: [(img_auc, pix_ap) for seed 0, seed 1]
        "main": [(0.90, 0.50), (0.92, 0.54)],
        "no_scale_context": [(0.905, 0.52), (0.925, 0.53)],
        "no_tail_loss": [(0.80, 0.40), (0.82, 0.41)],
    }
    num = 0
    for name, pairs in figures.items():
        for seed, (auc, ap) in enumerate(pairs):
            warnings = [COLLAPSE] if name == "no_tail_loss" and seed == 1 else []
            fake_run(
                real_metrics, multirun / f"{num}_{name}", t, [f"+ablation={name}"], seed, auc, ap, warnings=warnings
            )
            num += 1
    fake_run(real_metrics, multirun / f"{num}_no_whitening", t, ["+ablation=no_whitening"], 0, 0.5, 0.1, "running")
    return multirun


def test_table1_mean_std_deltas_and_spread_marks(table1_dir: Path) -> None:
    runs = collect_runs([table1_dir])
    assert len(runs) == 7
    result = build_table("table1_core_ablation", runs)
    assert [r.label for r in result.rows] == [r.label for r in TABLES["table1_core_ablation"].rows]
    # MAIN: Img AUC 90, 92 -> 91.00, sample std sqrt(2) = 1.41; Pix AP 50, 54 -> 52.00 ± 2.83
    assert cell(result, "MAIN", "Img AUC") == "91.00 ± 1.41"
    assert cell(result, "MAIN", "Pix AP") == "52.00 ± 2.83"
    assert cell(result, "MAIN", "Δ Img AUC") == "-"
    assert cell(result, "MAIN", "Rt Acc") == "100.00 ± 0.00"
    # w/o scale context: 91.50 ± 1.41 -> +0.50 < 1.41: within spread; Pix AP 52.50 ± 0.71 -> +0.50 < 2.83
    assert cell(result, "w/o scale context", "Img AUC") == "91.50 ± 1.41"
    assert cell(result, "w/o scale context", "Δ Img AUC") == "+0.50 ≈"
    assert cell(result, "w/o scale context", "Δ Pix AP") == "+0.50 ≈"
    # w/o tail-aware loss: 81.00 -> -10.00 and 40.50 ± 0.71 -> -11.50, both beyond the spread
    assert cell(result, "w/o tail-aware loss", "Pix AP") == "40.50 ± 0.71"
    assert cell(result, "w/o tail-aware loss", "Δ Img AUC") == "-10.00"
    assert cell(result, "w/o tail-aware loss", "Δ Pix AP") == "-11.50"
    assert result.row("w/o tail-aware loss").deltas["img_auc"] == pytest.approx(-10.0)
    assert result.row("MAIN").n_seeds == 2
    # rows without runs: no figures, "not run"
    for label in ("w/o LoRA (plain linear task layers)", "w/o whitening adapter"):
        assert cell(result, label, "Img AUC") == "—" and cell(result, label, "Δ Pix AP") == "—"
        assert "not run" in cell(result, label, "note")
    text = result.markdown()
    assert "within seed spread" in text
    assert "data: generated (synthetic), not MVTec AD" in text


def test_unfinished_run_is_skipped_and_listed(table1_dir: Path) -> None:
    result = build_table("table1_core_ablation", collect_runs([table1_dir]))
    assert len(result.runs_used) == 6
    assert [Path(name).name for name, _ in result.skipped] == ["6_no_whitening"]
    assert "running" in result.skipped[0][1]
    assert "## Skipped (1)" in result.markdown()


def test_warnings_become_a_footnote(table1_dir: Path) -> None:
    result = build_table("table1_core_ablation", collect_runs([table1_dir]))
    note = cell(result, "w/o tail-aware loss", "note")
    assert note.startswith("warnings [")
    marker = note.removeprefix("warnings ")
    assert f"- {marker} w/o tail-aware loss: seed 1 (5_no_tail_loss): {COLLAPSE}" in result.markdown()
    assert "warnings" not in cell(result, "MAIN", "note")


def test_cli_writes_outputs_with_reference_columns(table1_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tables"
    assert main([str(table1_dir), "--out", str(out), "--reference"]) == 0  # table inferred from task_name
    md = (out / "table1_core_ablation.md").read_text()
    assert "| configuration | Img AUC | Img AUC (ref) | Pix AUC | Pix AUC (ref) |" in md
    main_row = next(line for line in md.splitlines() if line.startswith("| MAIN |"))
    assert main_row.startswith("| MAIN | 91.00 ± 1.41 | 98.29 | ")
    assert "| w/o tail-aware loss | 81.00 ± 1.41 | 96.62 |" in md
    rows = list(csv.DictReader((out / "table1_core_ablation.csv").open()))
    assert [r["label"] for r in rows][:2] == ["MAIN", "w/o LoRA (plain linear task layers)"]
    by_label = {r["label"]: r for r in rows}
    assert float(by_label["MAIN"]["img_auc_mean"]) == pytest.approx(91.0)
    assert float(by_label["MAIN"]["ref_img_auc"]) == 98.29
    assert float(by_label["w/o tail-aware loss"]["delta_pix_ap"]) == pytest.approx(-11.5)
    assert by_label["w/o scale context"]["within_spread_img_auc"] == "true"
    assert by_label["w/o LoRA (plain linear task layers)"]["n_seeds"] == "0"
    assert (out / "table1_core_ablation.png").stat().st_size > 0


def test_cli_rejects_unknown_or_ambiguous_table(real_metrics, tmp_path: Path, capsys) -> None:
    fake_run(real_metrics, tmp_path / "a", "generated_quick", [], 0, 0.9, 0.5)
    assert main([str(tmp_path)]) == 2
    assert "pass --table, one of: table1_core_ablation" in capsys.readouterr().err
    fake_run(real_metrics, tmp_path / "b", "table3_2_depth", [], 0, 0.9, 0.5)
    fake_run(real_metrics, tmp_path / "c", "sweep_lora_rank", [], 0, 0.9, 0.5)
    assert main([str(tmp_path)]) == 2
    assert "several tables" in capsys.readouterr().err


def test_runs_are_filed_under_the_values_the_model_was_built_with(real_metrics, tmp_path: Path) -> None:
    """A run whose derived copy differs from the knob (``model.flow.ncl=8`` before that was refused records
    ``ncl: 6`` beside ``model.flow.ncl: 8``) is filed under 8, the depth it really had."""
    t = "table3_2_depth"
    run = fake_run(real_metrics, tmp_path / "depth" / "0_x", t, ["model.flow.ncl=8"], 0, 0.9, 0.5, config={"ncl": 8})
    data = json.loads((run / "metrics.json").read_text())
    data["config"]["ncl"] = 6
    (run / "metrics.json").write_text(json.dumps(data))
    result = build_table(t, collect_runs([tmp_path / "depth"]))
    assert result.row("8").n_seeds == 1 and result.row("6").n_seeds == 0


def test_depth_table_rows_in_ncl_order_with_missing_row_and_plot(real_metrics, tmp_path: Path) -> None:
    multirun = tmp_path / "depth"
    t = "table3_2_depth"
    for num, ncl in enumerate((12, 4, 8, 2)):  # no NCL 6 (MAIN) run; 2 is not a row of the study
        fake_run(real_metrics, multirun / f"{num}_ncl={ncl}", t, [f"ncl={ncl}"], 0, 0.9, None, config={"ncl": ncl})
    fake_run(real_metrics, multirun / "4_dia", t, ["ncl=4"], 1, 0.9, 0.5, config={"ncl": 4, "dia_blocks": 2})
    out = tmp_path / "out"
    assert main([str(multirun), "--out", str(out)]) == 0
    result = build_table(t, collect_runs([multirun]))
    assert [r.label for r in result.rows] == ["2", "4", "6", "8", "12", "16", "20"]
    assert [r.n_seeds for r in result.rows] == [1, 1, 0, 1, 1, 0, 0]
    assert cell(result, "6", "Img AUC") == "—" and cell(result, "6", "note") == "MAIN; not run"
    assert cell(result, "4", "Img AUC") == "90.00"
    assert cell(result, "4", "Pix AP") == "n/a"  # null in metrics.json: never a number
    assert "dia_blocks=2" in result.skipped[0][1]
    assert "MAIN (6) not run: no deltas." in result.notes
    assert any("One seed per row" in n for n in result.notes)
    md = (out / "table3_2_depth.md").read_text()
    assert md.index("| 4 | 90.00") < md.index("| 6 | —") < md.index("| 8 | 90.00") < md.index("| 12 | 90.00")
    assert (out / "table3_2_depth.png").read_bytes()[:4] == b"\x89PNG"


def test_score_top_k_sweep_reads_eval_rows(real_metrics, tmp_path: Path, tiny_run) -> None:
    _, run_dir, _ = tiny_run
    rows = [
        {"score_top_k": k, "final": {"routed": {**real_metrics["final"]["routed"], "image_auroc": auc}}}
        for k, auc in ((1, 0.7), (3, 0.8), (7, 0.75))
    ]
    for row in rows:
        row["routing_accuracy"] = 1.0
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    (eval_dir / "eval_metrics.json").write_text(json.dumps({"checkpoint": ckpt, "tasks": [], "rows": rows}))
    result = build_table("sweep_score_top_k", collect_runs([eval_dir]))
    assert [(r.label, r.n_seeds) for r in result.rows] == [("1", 1), ("3", 1), ("5", 0), ("7", 1), ("10", 0)]
    assert cell(result, "3", "Img AUC") == "80.00"
    assert "data: generated (synthetic), not MVTec AD" in result.data_line  # from the trained run's metrics.json


def test_specs_match_the_experiment_configs_and_reference_deltas() -> None:
    for name, spec in TABLES.items():
        assert set(spec.metrics) <= set(METRICS) and set(spec.deltas) <= set(spec.metrics)
        assert sum(1 for r in spec.rows if r.key == spec.main) == 1, name
        for row in spec.rows:
            assert len(row.cells) == len(spec.label_headers) - 1, (name, row.label)
            for m, d in row.ref_delta.items():  # typed-in deltas agree with the typed-in figures
                main_ref = next(r for r in spec.rows if r.key == spec.main).ref
                assert d == pytest.approx(row.ref[m] - main_ref[m], abs=0.011), (name, row.label, m)
        if spec.source == "eval":
            continue
        params = OmegaConf.load(ROOT / "conf" / "experiment" / f"{name}.yaml").hydra.sweeper.params
        swept = str(params["+ablation" if spec.row_by == "ablation" else spec.row_by]).split(",")
        keys = [r.key for r in spec.rows]
        if spec.row_by == "ablation":
            assert swept == keys, name
            assert all((ROOT / "conf" / "ablation" / f"{k}.yaml").is_file() for k in keys)
        else:
            assert [float(v) for v in swept] == [float(k) for k in keys], name


def test_real_multirun_end_to_end(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "src/train.py",
        "-m",
        "experiment=generated_quick",
        "logger=none",
        "training.epochs=1",
        "ncl=2,4",
        "model.flow.embed_dim=32",
        "model.flow.hidden=32",
        "lora_rank=4",
        f"hydra.sweep.dir={sweep}",
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    assert len(list(sweep.glob("*/metrics.json"))) == 2  # one per job
    out = tmp_path / "tables"
    tables = [
        sys.executable,
        "-m",
        "experiments.tables",
        str(sweep),
        "--table",
        "table3_2_depth",
        "--out",
        str(out),
    ]
    done = subprocess.run(tables, cwd=ROOT, check=True, capture_output=True, text=True, timeout=120)
    assert "2 of 7 rows with runs, 2 runs used, 0 skipped" in done.stdout
    rows = [r for r in csv.DictReader((out / "table3_2_depth.csv").open()) if r["n_seeds"] != "0"]
    assert [(r["label"], r["n_seeds"]) for r in rows] == [("2", "1"), ("4", "1")]
    assert all(0.0 <= float(r["pix_auc_mean"]) <= 100.0 for r in rows)
    md = (out / "table3_2_depth.md").read_text()
    assert "data: generated (synthetic), not MVTec AD" in md
    assert (out / "table3_2_depth.png").is_file()


@pytest.mark.parametrize(
    ("data", "says", "called_mvtec"),
    [
        (  # MVTec layout read with data=mvtec, but not MVTec's categories: never called MVTec AD
            {"name": "mvtec", "source": "mvtec", "root": "/data/parts", "categories": ["stripes", "dots"]},
            "a data set in MVTec layout, not MVTec AD (categories ['stripes', 'dots'] are not MVTec AD's) "
            "(read from root /data/parts; categories stripes, dots)",
            False,
        ),
        (
            {"name": "mvtec", "source": "mvtec", "root": "/data/mvtec_ad", "categories": ["bottle", "cable"]},
            "MVTec AD (2 of 15 categories) (read from root /data/mvtec_ad; categories bottle, cable)",
            True,
        ),
        (
            {"name": "mpdd", "source": "mvtec", "root": "/data/mpdd", "categories": ["tubes"]},
            "mpdd (source mvtec), not MVTec AD (read from root /data/mpdd; categories tubes)",
            False,
        ),
        (
            {"name": "elpv", "source": "elpv", "root": None, "categories": ["mono", "poly"]},
            "ELPV solar cells, not MVTec AD (read from the elpv-dataset package; categories mono, poly)",
            False,
        ),
    ],
    ids=["mvtec_layout_other_categories", "mvtec_subset", "mpdd", "elpv"],
)
def test_provenance_names_what_was_read(real_metrics, tmp_path: Path, data, says: str, called_mvtec: bool) -> None:
    config = {"data": {**real_metrics["config"]["data"], **data}}
    table = "table1_core_ablation"
    run = fake_run(real_metrics, tmp_path / "run", table, ["+ablation=main"], 0, 0.9, 0.5, config=config)
    line = build_table(table, collect_runs([run])).data_line
    assert f"data: {says};" in line
    assert line.split("data: ")[1].startswith("MVTec AD") == called_mvtec
