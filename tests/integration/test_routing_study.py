"""experiments/routing_study.py on generated data: its per-label counts are those of the router it names."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from experiments import routing_study
from experiments.routing_study import feature_cache, markdown, parse_router, study
from moleflow.models.router import build_router
from moleflow.thresholds.held_out import holdout_split
from tests.helpers import TINY_OVERRIDES, compose_config


def test_parse_router_reads_every_option() -> None:
    kind, options = parse_router("positional:grid=3,keep=0.5,global_vote=1", {"ridge": 1e-5, "grid": 7})
    assert kind == "positional" and options == {"ridge": 1e-5, "grid": 3, "keep": 0.5, "global_vote": True}
    assert parse_router("positional:global_vote=false", {})[1] == {"global_vote": False}


def test_study_counts_routing_per_label_as_a_hand_count(
    tmp_path: Path, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null", "data.num_workers=0"]
    cfg = compose_config(overrides, tmp_path)
    spec = "positional:grid=2,keep=0.5,global_vote=1"
    # route thresholds that tell the unknown rules apart: task 0 never flags, the others always do
    fitted = iter([math.inf, -math.inf, -math.inf] * 2)
    monkeypatch.setattr(routing_study, "tail_threshold", lambda *args: next(fitted))
    results = study(cfg, ["prototype", spec], tmp_path / "cache", holdout=0.25)
    assert set(results["routers"]) == {"prototype", spec}
    assert results["routers"][spec]["options"]["global_vote"] is True

    # the same router by hand, from the cached features the study wrote
    from moleflow.assembly.builders import build_datamodule

    dm = build_datamodule(cfg.data)
    cache = feature_cache(cfg, tmp_path / "cache")
    assert cache.extractions == 0
    flow = cfg.model.flow
    router = build_router(
        "positional",
        int(flow.embed_dim),
        ridge=float(flow.router_ridge),
        grid=2,
        keep=0.5,
        variance_floor=float(flow.router_variance_floor),
        global_vote=True,
    )
    tests = []
    for t, name in enumerate(dm.task_names):
        dm.set_task(t)
        train = cache.get(f"{t:02d}_{name}/train", dm.train_dataloader, with_masks=False)
        tests.append(cache.get(f"{t:02d}_{name}/test", lambda t=t: dm.test_dataloader_for(t), with_masks=False))
        inputs = router.summarize(train.features)
        kept, _ = holdout_split(len(inputs), 0.25, int(cfg.seed) + 1000 * (t + 1))
        router.fit_task(t, inputs[kept])
    thresholds = torch.tensor(results["routers"][spec]["route_thresholds"], dtype=torch.float64)
    for t, (name, feats) in enumerate(zip(dm.task_names, tests, strict=True)):
        dists = router.distances(router.summarize(feats.features))
        routed = dists.argmin(dim=1)
        own = dists.gather(1, routed[:, None]).squeeze(1) > thresholds[routed]  # beyond its own task's threshold
        row = results["routers"][spec]["per_task"][name]
        for label, key in ((0, "normal"), (1, "defective")):
            keep = feats.labels == label
            assert row[key] == float((routed[keep] == t).double().mean())
            assert row[f"unknown_{key}"] == float(own[keep].double().mean())
            assert row[f"silent_{key}"] == int(((routed != t) & ~own)[keep].sum())
        assert own.tolist() == (routed != 0).tolist()  # flagged exactly when routed to a task that always flags
    assert cache.extractions == 0  # every split came from the study's cache files
    text = markdown(results, "cmd")
    assert f"`{spec}`" in text and "not flagged unknown" in text


def test_runs_table_names_the_router_settings(tmp_path: Path) -> None:
    import json

    from experiments.routing_study import from_runs

    flow = {"router": "positional", "router_grid": 14, "router_keep": 0.1, "router_global_vote": True}
    row = {"routing_accuracy": 0.5, "routing_accuracy_normal": 1.0, "routing_accuracy_defective": 0.25}
    run = tmp_path / "run_0"
    run.mkdir()
    payload = {
        "config": {"model": {"flow": flow}},
        "per_task": {"mono": row},
        "thresholds": {"per_task": {"mono": {"fpr": 0.02, "recall": 0.4}}},
    }
    (run / "metrics.json").write_text(json.dumps(payload))
    assert "| run_0 | positional 14/0.1, vote | mono | 50.0 | 100.0 | 25.0 | 2.0 | 40.0 |" in from_runs([run])
