"""Every ablation and experiment file composes, changes only its own keys, and really changes the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiments.tables.specs import TABLES
from moleflow.config.ablation_rows import read_ablation_rows, sweep_of
from moleflow.config.loss import LossConfig
from moleflow.training.losses import moleflow_loss
from moleflow.training.trainer_parts import build_module
from tests.helpers import CONF_DIR, compose_config

SMALL = ["model.flow.embed_dim=16", "model.flow.hidden=16"]  # rank stays a config value (rank-16 row)

# ablation -> the config keys it may change (everything else must equal MAIN)
EXPECTED_CHANGES = {
    "main": set(),  # ablation_name stays "main"
    "no_spatial_context": {"spatial_context_kernel", "model.flow.spatial_context_kernel"},
    "no_whitening": {"model.flow.adapter"},
    "no_tail_loss": {"tail_weight", "model.loss.tail_weight"},
    "no_logdet": {"lambda_logdet", "model.loss.lambda_logdet"},
    "no_scale_context": {"scale_context_kernel", "model.flow.scale_context_kernel"},
    "no_lora": {"model.flow.expert_mode"},
    "no_mole_subnet": {"model.flow.expert_mode"},
    "complete_separated": {"model.flow.base_sharing"},
    "sequential": {"model.flow.base_sharing", "model.flow.expert_mode"},
    "lora_rank_16": {"lora_rank", "model.flow.lora_rank"},
    **{
        f"mix_{n}_{d}": {"ncl", "model.flow.ncl", "dia_blocks", "model.flow.dia_blocks"}
        - ({"ncl", "model.flow.ncl"} if n == 6 else set())
        - ({"dia_blocks", "model.flow.dia_blocks"} if d == 0 else set())
        for n, d in [(10, 2), (8, 4), (6, 6), (4, 8), (0, 12), (6, 0)]
    },
}


IGNORED = {"run_name", "logger.wandb.name"}  # named after the overrides, so they differ by design
METADATA = "table_rows"  # the row's place in the tables: not a setting


def _flat(cfg) -> dict[str, object]:
    """Resolved config (without hydra and paths) as {dotted.key: value}."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, object] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif prefix[:-1] not in IGNORED:
            out[prefix[:-1]] = node

    walk({k: v for k, v in resolved.items() if k not in ("hydra", "paths", METADATA)}, "")
    return out


def test_every_ablation_file_is_covered() -> None:
    files = {p.stem for p in (CONF_DIR / "ablation").glob("*.yaml")}
    assert files == set(EXPECTED_CHANGES)


@pytest.mark.parametrize("ablation", sorted(EXPECTED_CHANGES))
def test_ablation_changes_only_its_keys(ablation: str, tmp_path: Path) -> None:
    main = _flat(compose_config([], tmp_path))
    abl = _flat(compose_config([f"+ablation={ablation}"], tmp_path))
    changed = {k for k in main.keys() | abl.keys() if main.get(k) != abl.get(k)}
    assert abl["ablation_name"] == ablation
    if ablation != "main":  # the W&B tags name the row (ablation_name)
        assert abl["logger.wandb.tags"] != main["logger.wandb.tags"]
    assert changed - {"ablation_name", "logger.wandb.tags"} == EXPECTED_CHANGES[ablation]


def _module(tmp_path: Path, ablation: str, tasks: int = 2):
    cfg = compose_config([*SMALL, f"+ablation={ablation}"], tmp_path)
    torch.manual_seed(0)
    module = build_module(cfg.model)
    for t in range(tasks):
        module.start_task(f"t{t}")
    return module


def _trainable(module, task: int) -> set[str]:
    return set(module.model.set_trainable(task))


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(2, 4, 4, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def main_module(tmp_path_factory):
    return _module(tmp_path_factory.mktemp("main"), "main")


STRUCTURAL = [
    "no_spatial_context", "no_whitening", "no_scale_context", "no_lora", "no_mole_subnet",
    "complete_separated", "sequential", "lora_rank_16", "mix_10_2", "mix_0_12",
]  # fmt: skip


@pytest.mark.parametrize("ablation", STRUCTURAL)
def test_structural_ablation_changes_the_model(ablation: str, tmp_path: Path, main_module, features) -> None:
    module = _module(tmp_path, ablation)
    main_counts = main_module.model.parameter_counts()
    counts = module.model.parameter_counts()
    main_train1, train1 = _trainable(main_module, 1), _trainable(module, 1)
    differs = counts != main_counts or main_train1 != train1
    if not differs:  # same sizes and trainable sets: the function itself must differ
        with torch.no_grad():
            differs = not torch.equal(module.model.nll(features, 0)[0], main_module.model.nll(features, 0)[0])
    assert differs
    m = module.model
    if ablation == "no_spatial_context":
        assert len(m.mixers) == 0 and len(main_module.model.mixers) == 1
    elif ablation == "no_whitening":
        assert len(m.adapters) == 0
    elif ablation == "no_scale_context":
        assert all(b.subnet.scale_context is None for b in m.flows["shared"].blocks)
    elif ablation == "no_lora":
        assert any(n.endswith(".experts.1.weight") for n in train1)  # full-rank copies, no A/B
        assert not any(n.endswith(".experts.1.A") for n in train1)
    elif ablation == "no_mole_subnet":
        assert all(n.startswith("adapters.1.") for n in train1)
    elif ablation == "complete_separated":
        assert counts["shared"] == 0 and set(m.flows) == {"0", "1"}
        assert counts["per_task"][1] > main_counts["per_task"][1]
    elif ablation == "sequential":
        assert any(".base." in n for n in train1)  # the base keeps training on task 1
    elif ablation == "lora_rank_16":
        ranks = {p.shape[0] for n, p in m.named_parameters() if n.endswith(".experts.1.A")}
        assert ranks == {16} and counts["per_task"][1] != main_counts["per_task"][1]
    elif ablation.startswith("mix_"):
        n, d = map(int, ablation.split("_")[1:])
        assert len(m.flows["shared"].blocks) == n and len(m.dia["1"].blocks) == d


@pytest.mark.parametrize(("ablation", "field"), [("no_tail_loss", "tail_weight"), ("no_logdet", "lambda_logdet")])
def test_loss_ablation_changes_the_loss_not_the_model(ablation, field, tmp_path, main_module, features) -> None:
    module = _module(tmp_path, ablation)
    assert getattr(module.loss_cfg, field) == 0 and getattr(main_module.loss_cfg, field) > 0
    assert module.model.parameter_counts() == main_module.model.parameter_counts()
    nll = torch.rand(2, 8, 8) * 100
    nll[:, 0, 0] = 1000.0  # a tail patch
    logdet = torch.full((2, 8, 8), 50.0)
    main_loss, _ = moleflow_loss(nll, logdet, main_module.loss_cfg)
    loss, _ = moleflow_loss(nll, logdet, LossConfig(**{**main_module.loss_cfg.__dict__, field: 0.0}))
    assert not torch.isclose(main_loss, loss)


def test_every_ablation_file_names_its_rows_and_not_itself() -> None:
    """One file per row: its name is the file name, and it says which tables it is a row of."""
    tables = read_ablation_rows(CONF_DIR / "ablation")
    for path in sorted((CONF_DIR / "ablation").glob("*.yaml")):
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        assert raw["ablation_name"] == "${hydra:runtime.choices.ablation}", path.name
        assert raw.get(METADATA), f"{path.name} is a row of no table"
        assert set(raw[METADATA]) <= set(TABLES), path.name
    for name, rows in tables.items():
        assert [r.key for r in TABLES[name].rows] == [r.name for r in rows]


@pytest.mark.parametrize("table", [t.name for t in TABLES.values() if t.row_by == "ablation"])
def test_table_sweeps_are_the_rows_of_the_ablation_files(table: str, tmp_path: Path) -> None:
    """conf/experiment/<table>.yaml sweeps +ablation over exactly the files that name the table, in order."""
    cfg = compose_config([f"experiment={table}"], tmp_path)
    swept = str(cfg.hydra.sweeper.params["+ablation"]).split(",")
    assert swept == [r.key for r in TABLES[table].rows]
    assert swept == sweep_of(CONF_DIR / "ablation", table).split(",")


def test_a_new_row_is_one_file(tmp_path: Path) -> None:
    """A file that names a table under table_rows becomes a row of that table and of its sweep."""
    import shutil

    ablations = tmp_path / "ablation"
    shutil.copytree(CONF_DIR / "ablation", ablations)
    (ablations / "no_positional.yaml").write_text(
        "# @package _global_\nmodel:\n  flow:\n    positional_encoding: false\n"
        "ablation_name: ${hydra:runtime.choices.ablation}\n"
        "table_rows:\n  table1_core_ablation: {order: 9, label: w/o positional code}\n"
    )
    rows = read_ablation_rows(ablations)["table1_core_ablation"]
    assert rows[-1].name == "no_positional" and rows[-1].label == "w/o positional code"
    assert rows[-1].sets == {"model.flow.positional_encoding": False}
    assert sweep_of(ablations, "table1_core_ablation").endswith(",no_tail_loss,no_positional")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_file_composes(experiment: str, tmp_path: Path) -> None:
    cfg = compose_config([f"experiment={experiment}"], tmp_path)
    assert cfg.task_name
    if experiment.startswith(("table", "sweep")):
        assert cfg.hydra.mode.name == "MULTIRUN"
        assert cfg.hydra.sweeper.params
