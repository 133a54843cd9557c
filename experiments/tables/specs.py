"""The study's tables as data: rows, columns, MAIN row and reference figures of docs/study.md.

The named rows of the ablation tables (1, 2, 3, 4) are not written here: each comes from its file
``conf/ablation/<row>.yaml`` (``table_rows``: position, label, reference figures), read by
:func:`moleflow.config.ablation_rows.read_ablation_rows`. Adding a row is adding that file.

Kept apart from the table code so that the shape of every table (and the reference figures it is
compared against) can be read and checked without reading any aggregation code. Reference
figures are typed in, in percent, exactly as the study reports them; they are never used as
results, only shown beside ours with ``--reference``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moleflow.config.ablation_rows import read_ablation_rows
from moleflow.config.flow import MoLEFlowConfig
from moleflow.config.loss import LossConfig
from moleflow.config.resolvers import DEFAULT_CONF_DIR
from moleflow.config.score import ScoreConfig
from moleflow.config.sweeps import sweep_values

ABLATION_DIR = DEFAULT_CONF_DIR / "ablation"


@dataclass(frozen=True)
class MetricSpec:
    """One metric: its column header, where it lives in metrics.json / an eval_metrics.json row, its scale."""

    header: str
    train_path: tuple[str, ...]
    eval_path: tuple[str, ...] | None = None  # None: not in eval_metrics.json rows
    scale: float = 100.0  # stored as fractions, shown in percent


@dataclass(frozen=True)
class RowSpec:
    """One row of a table: the runs it takes (ablation name or swept value) and how it is labelled."""

    key: str | float
    label: str
    cells: tuple[str, ...] = ()  # further label columns (Table 3: DIA blocks, total; Table 4: description)
    note: str = ""  # what the row is (ours; no result claims)
    ref: dict[str, float] = field(default_factory=dict)  # reference figures in percent, by metric id
    ref_delta: dict[str, float] = field(default_factory=dict)  # deltas as typed in the study
    ref_note: str = ""  # the study's reading of the row
    expect: dict[str, Any] = field(default_factory=dict)  # config values the row's runs must have


@dataclass(frozen=True)
class TableSpec:
    """One table of the study: how runs map to rows, which columns, which row is MAIN, how it is plotted."""

    name: str  # = conf/experiment/<name>.yaml (and the task_name / group its runs carry)
    title: str
    row_by: str  # "ablation" (the +ablation=NAME override) or a top-level config key
    label_headers: tuple[str, ...]
    metrics: tuple[str, ...]  # metric ids, in the study's column order
    deltas: tuple[str, ...]  # metric ids whose delta against MAIN is a column in the study
    main: str | float  # key of the MAIN row (the delta reference)
    rows: tuple[RowSpec, ...]
    plot: str  # "ablation_bars" | "line" | "block_mix"
    source: str = "train"  # "train": metrics.json; "eval": the rows of eval_metrics.json
    open_rows: bool = False  # swept values outside ``rows`` get rows of their own (else they are skipped)
    x_label: str = ""
    x_scale: str = "linear"  # "linear" | "log2" | "category"
    fixed: dict[str, Any] = field(default_factory=dict)  # config values every run of the table must have
    param_note: bool = False  # the study comments on parameter counts: report ours
    reading: str = ""  # the study's reported reading (shown with --reference)


METRICS: dict[str, MetricSpec] = {
    "img_auc": MetricSpec("Img AUC", ("final", "routed", "image_auroc"), ("final", "routed", "image_auroc")),
    "pix_auc": MetricSpec("Pix AUC", ("final", "routed", "pixel_auroc"), ("final", "routed", "pixel_auroc")),
    "img_ap": MetricSpec("Img AP", ("final", "routed", "image_ap"), ("final", "routed", "image_ap")),
    "pix_ap": MetricSpec("Pix AP", ("final", "routed", "pixel_ap"), ("final", "routed", "pixel_ap")),
    "rt_acc": MetricSpec("Rt Acc", ("routing", "accuracy"), ("routing_accuracy",)),
}

# In the CSV only: forgetting and model size, useful to read Table 4 (b) and the "15x parameters" remarks.
EXTRA_METRICS: dict[str, MetricSpec] = {
    "fm_img_auc": MetricSpec("FM Img AUC", ("forgetting", "routed", "image_auroc", "fm")),
    "bwt_img_auc": MetricSpec("BWT Img AUC", ("forgetting", "routed", "image_auroc", "bwt")),
    "fm_pix_ap": MetricSpec("FM Pix AP", ("forgetting", "routed", "pixel_ap", "fm")),
    "bwt_pix_ap": MetricSpec("BWT Pix AP", ("forgetting", "routed", "pixel_ap", "bwt")),
    "img_f1": MetricSpec("Img F1-max", ("final", "routed", "image_f1_max"), ("final", "routed", "image_f1_max")),
    "pix_f1": MetricSpec("Pix F1-max", ("final", "routed", "pixel_f1_max"), ("final", "routed", "pixel_f1_max")),
    "params_total": MetricSpec("Params", ("parameters", "total"), scale=1.0),
    "rt_nrm": MetricSpec("Rt Nrm", ("routing", "by_label", "normal", "accuracy")),
    "rt_def": MetricSpec("Rt Def", ("routing", "by_label", "defective", "accuracy")),
}

ALL_METRICS: dict[str, MetricSpec] = {**METRICS, **EXTRA_METRICS}

# Metrics drawn as delta bars for the ablation tables.
PLOT_DELTAS: tuple[str, ...] = ("img_auc", "pix_ap")

# What the data set of a run is called in the provenance line (config.data.name).
DATA_NAMES: dict[str, str] = {
    "mvtec": "MVTec AD",
    "generated": "generated (synthetic), not MVTec AD",
    "elpv": "ELPV solar cells, not MVTec AD",
    "folder": "a custom image folder, not MVTec AD",
}
MVTEC_CATEGORIES = 15

REFERENCE_SETTING = "full MVTec AD (15 tasks), WideResNet-50-2, 60 epochs per task, GPU; typed in from docs/study.md"
REFERENCE_SPREAD = "the reference study's two MAIN runs differ by about 0.25 Img AUC and 1.6 Pix AP"

FIVE = ("img_auc", "pix_auc", "img_ap", "pix_ap", "rt_acc")
MAIN_REF: dict[str, float] = {"img_auc": 98.29, "pix_auc": 97.82, "img_ap": 99.28, "pix_ap": 54.20, "rt_acc": 100.0}


def _ablation_rows(table: str) -> tuple[RowSpec, ...]:
    """The rows of an ablation table, from the ablation files that name it (in their ``order``)."""
    return tuple(
        RowSpec(
            row.name,
            row.label,
            cells=row.cells,
            note=row.note,
            ref=row.ref,
            ref_delta=row.ref_delta,
            ref_note=row.ref_note,
            expect=row.sets,
        )
        for row in read_ablation_rows(ABLATION_DIR).get(table, [])
    )


def _ref(*values: float | None, metrics: tuple[str, ...] = FIVE) -> dict[str, float]:
    """Reference figures typed in column order; None where the study reports nothing."""
    return {m: v for m, v in zip(metrics, values, strict=True) if v is not None}


T1_COLS = FIVE
T1 = TableSpec(
    name="table1_core_ablation",
    title="Table 1: core component ablation (each row removes one component from MAIN)",
    row_by="ablation",
    label_headers=("configuration",),
    metrics=T1_COLS,
    deltas=("img_auc", "pix_ap"),
    main="main",
    plot="ablation_bars",
    rows=_ablation_rows("table1_core_ablation"),
    reading=(
        "the tail-aware loss and the whitening adapter matter most (pixel AP); logdet regularization and the "
        "spatial context mixer matter moderately; scale context little. The study's 'w/o LoRA' row equals MAIN "
        "exactly, which suggests an ablation switch that was not wired."
    ),
)

T2_COLS = ("img_auc", "pix_auc", "pix_ap")
T2 = TableSpec(
    name="table2_subnet_ablation",
    title="Table 2: subnet ablation",
    row_by="ablation",
    label_headers=("configuration",),
    metrics=T2_COLS,
    deltas=("pix_ap",),
    main="main",
    plot="ablation_bars",
    param_note=True,
    rows=_ablation_rows("table2_subnet_ablation"),
    reading="Complete separated uses about 15x the parameters of MAIN.",
)

T3_COLS = ("img_auc", "pix_auc", "pix_ap")
T3 = TableSpec(
    name="table3_block_mix",
    title="Table 3: MoLE / DIA block mix",
    row_by="ablation",
    label_headers=("MoLE blocks", "DIA blocks", "total"),
    metrics=T3_COLS,
    deltas=(),
    main="mix_6_0",
    plot="block_mix",
    rows=_ablation_rows("table3_block_mix"),
)

T32 = TableSpec(
    name="table3_2_depth",
    title="Table 3.2: depth scaling, MoLE only (no DIA)",
    row_by="ncl",
    label_headers=("NCL",),
    metrics=FIVE,
    deltas=(),
    main=6,
    plot="line",
    open_rows=True,
    x_label="NCL (coupling blocks)",
    fixed={"dia_blocks": 0},
    rows=(
        RowSpec(4, "4", ref=_ref(97.84, 97.80, 99.12, 55.90, 100.0)),
        RowSpec(6, "6", note="MAIN", ref=dict(MAIN_REF), ref_note="MAIN"),
        RowSpec(8, "8", ref=_ref(97.99, 97.74, 99.23, 54.92, 100.0)),
        RowSpec(12, "12", ref=_ref(94.20, 94.16, 97.81, 51.82, 100.0), ref_note="degradation starts"),
        RowSpec(16, "16", ref=_ref(60.43, 53.50, 81.20, 10.67, 100.0), ref_note="training collapses"),
        RowSpec(20, "20", ref=_ref(58.60, 52.68, 80.40, 9.60, 100.0), ref_note="training fails"),
    ),
    reading="4 to 8 coupling layers train stably; 12 and deeper degrade or collapse without DIA.",
)

T4_COLS = ("img_auc", "pix_auc", "img_ap", "pix_ap")
T4 = TableSpec(
    name="table4_weight_sharing",
    title="Table 4: base weight sharing",
    row_by="ablation",
    label_headers=("setting", "description"),
    metrics=T4_COLS,
    deltas=(),
    main="main",
    plot="ablation_bars",
    param_note=True,
    rows=_ablation_rows("table4_weight_sharing"),
    reading="(b) is catastrophic forgetting; (c) costs about 15x the parameters.",
)


def _sweep(
    name: str,
    main: float,
    title: str,
    x_scale: str = "linear",
    source: str = "train",
    refs: dict[float, dict[str, float]] | None = None,
    reading: str = "only MAIN reported; the other values were never run",
    values: tuple[tuple[float, str], ...] | None = None,
    key: str | None = None,
) -> TableSpec:
    """A hyperparameter sweep around MAIN: one row per value; MAIN's figures are the reference at MAIN's value.

    The key and values come from the sweep's own file, ``conf/experiment/<name>.yaml``; ``values`` and ``key``
    are given only for a sweep without one (the evaluation-only score top-k sweep of ``src/eval.py``).
    """
    if values is None:
        key, read = sweep_values(DEFAULT_CONF_DIR, name)
        values = tuple(read)
    refs = refs if refs is not None else {main: dict(MAIN_REF)}
    rows = tuple(
        RowSpec(value, label, note="MAIN" if value == main else "", ref=refs.get(value, {})) for value, label in values
    )
    return TableSpec(
        name=name,
        title=title,
        row_by=str(key),
        label_headers=(str(key),),
        metrics=FIVE,
        deltas=(),
        main=main,
        rows=rows,
        plot="line",
        source=source,
        open_rows=True,
        x_label=str(key),
        x_scale=x_scale,
        reading=reading,
    )


MAIN_FLOW, MAIN_LOSS = MoLEFlowConfig(), LossConfig()  # MAIN's value of each swept knob: the settings' default
SWEEPS = (
    _sweep(
        "sweep_lora_rank",
        MAIN_FLOW.lora_rank,
        "Sweep: LoRA rank",
        x_scale="log2",
        refs={
            16: {"img_auc": 98.06, "pix_auc": 97.82, "pix_ap": 55.86},
            32: {"img_auc": 98.04, "pix_auc": 97.82, "pix_ap": 55.89},
            64: dict(MAIN_REF),
            128: {"img_auc": 98.04, "pix_auc": 97.82, "pix_ap": 55.80},
        },
        reading="Img AUC 98.06 / 98.04 / 98.29 / 98.04; Pix AP 55.86 / 55.89 / 54.20 / 55.80; Pix AUC 97.82 for all",
    ),
    _sweep("sweep_lambda_logdet", MAIN_LOSS.lambda_logdet, "Sweep: lambda_logdet", x_scale="category"),
    _sweep("sweep_scale_context_kernel", MAIN_FLOW.scale_context_kernel, "Sweep: scale context kernel (0 = disabled)"),
    _sweep(
        "sweep_spatial_context_kernel", MAIN_FLOW.spatial_context_kernel, "Sweep: spatial context kernel (0 = no mixer)"
    ),
    _sweep("sweep_tail_weight", MAIN_LOSS.tail_weight, "Sweep: tail weight"),
    _sweep(
        "sweep_tail_top_k_ratio",
        MAIN_LOSS.tail_top_k_ratio,
        "Sweep: tail-aware loss top-k ratio",
        reading="not in the study's sweep list (docs/method.md section 8 adds it); MAIN's value is the only reference",
    ),
    _sweep(
        "sweep_score_top_k",
        ScoreConfig().top_k,
        "Sweep: image score aggregation top-k (evaluation only, src/eval.py)",
        source="eval",
        values=((1, "1"), (3, "3"), (5, "5"), (10, "10")),
        key="score_top_k",
    ),
)

TABLES: dict[str, TableSpec] = {t.name: t for t in (T1, T2, T3, T32, T4, *SWEEPS)}
