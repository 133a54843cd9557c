"""A tiny 3-task run with ``model/router=robust`` (positional cells + global vote) and thresholds made in training
(3 of each task's 12 training images held out): training, checkpoints, metrics.json's verdicts, predict without a
calibration pass."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moleflow.data.inputs import to_model_inputs
from moleflow.data.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec
from moleflow.inference import MoLEFlowDetector, load_exported
from moleflow.models.router import PositionalRouter, PrototypeRouter
from moleflow.training.module_checkpoints import load_checkpoint
from tests.helpers import TINY_OVERRIDES, compose_config

TASKS = ["stripes", "checker", "dots"]
UNSEEN = [c for c in SYNTHETIC_CATEGORIES if c not in TASKS]


@pytest.fixture(scope="module")
def positional_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path):
    from train import train

    out = tmp_path_factory.mktemp("positional_run")
    overrides = [*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null"]
    # the presets' router (positional cells with the global vote) on a 4 x 4 grid: 16 cells of the tiny patch grid
    overrides += ["model/router=robust", "model.flow.router_grid=4", "training.calibration_share=0.25"]
    cfg = compose_config(overrides, out)
    train(cfg)
    return out, overrides


def test_run_routes_with_the_positional_router_and_never_changes_earlier_statistics(positional_run) -> None:
    out, _ = positional_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["config"]["model"]["flow"]["router"] == "positional"
    assert metrics["routing"]["by_label"]["defective"]["images"] == 24
    # defect-free images of three generated categories route home (random backbone, 12 training images per task;
    # with the robust router the 24 defective ones do too here; the plain positional router sent 2 to "dots")
    assert metrics["routing"]["by_label"]["normal"]["accuracy"] == 1.0
    first = load_checkpoint(out / "checkpoints" / "task_00_stripes.ckpt").model.router
    last = load_checkpoint(out / "checkpoints" / "last.ckpt").model.router
    assert isinstance(last, PositionalRouter) and last.num_tasks == 3 and last.grid == 4
    assert last.train_counts.tolist() == [9, 9, 9]  # 3 of 12 images per task held out for the thresholds
    assert torch.equal(first.means[0], last.means[0]) and torch.equal(first.variances[0], last.variances[0])
    assert last.global_vote and last.global_router is not None  # the vote's global Gaussians are in the checkpoint
    assert torch.equal(first.global_router.means[0], last.global_router.means[0])
    assert torch.equal(first.global_router.precisions[0], last.global_router.precisions[0])


def test_predict_flags_never_trained_categories_and_not_known_ones(
    positional_run, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    out, _ = positional_run
    ckpt = tmp_path_factory.mktemp("positional_ckpt") / "last.ckpt"
    shutil.copyfile(out / "checkpoints" / "last.ckpt", ckpt)
    detector = MoLEFlowDetector.load(ckpt, auto_calibrate=False)  # thresholds stored by training: no calibration
    assert detector.calibration is not None and detector.calibration.in_sample_tasks == []
    known = [(t, p) for t in TASKS for p in sorted((synthetic_root / t / "test" / "good").glob("*.png"))]
    results = detector.predict([p for _, p in known])
    assert [r.task for r in results] == [t for t, _ in known]
    assert not any(r.is_unknown for r in results)
    unseen_root = tmp_path_factory.mktemp("unseen_positional")
    generate_synthetic_mvtec(unseen_root, categories=UNSEEN, num_train=3, num_test_good=0, num_test_defect=1)
    unseen = sorted(unseen_root.rglob("*/train/good/*.png"))
    assert unseen and all(r.is_unknown for r in detector.predict(unseen))
    # the export traces the detector's own pipeline, the positional router included; parity on known images
    probe = [p for _, p in known[:2]] + unseen[:1]
    module, _ = load_exported(detector.export(tmp_path_factory.mktemp("export") / "model.pt", check_images=probe))
    batch = torch.stack([x.tensor for x in to_model_inputs(probe, detector.image_size)])
    with torch.no_grad():
        got, ref = module(batch), detector.run_batch(batch)
    assert torch.equal(got["task"], ref["task"]) and torch.equal(got["is_unknown"], ref["is_unknown"])
    torch.testing.assert_close(got["distances"], ref["distances"], rtol=1e-6, atol=1e-6)


def test_thresholds_made_in_training_are_stored_and_predict_gives_the_reported_verdicts(
    positional_run, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, _ = positional_run
    metrics = json.loads((out / "metrics.json").read_text())
    thresholds = metrics["thresholds"]
    assert thresholds["held_out_images"] == {t: 3 for t in TASKS} and thresholds["calibration_share"] == 0.25
    first = MoLEFlowDetector.load(out / "checkpoints" / "task_00_stripes.ckpt", auto_calibrate=False)
    assert list(first.calibration.tasks) == ["stripes"]

    def no_calibration(*args, **kwargs):
        raise AssertionError("predict calibrated although the checkpoint holds thresholds")

    monkeypatch.setattr(MoLEFlowDetector, "calibrate", no_calibration)
    detector = MoLEFlowDetector.load(out / "checkpoints" / "last.ckpt")
    assert first.thresholds["stripes"] == detector.thresholds["stripes"]  # later tasks never change it
    for task in TASKS:
        row = thresholds["per_task"][task]
        assert row["score_threshold"] == detector.thresholds[task]
        good = sorted((synthetic_root / task / "test" / "good").glob("*.png"))
        bad = sorted(p for p in (synthetic_root / task / "test").rglob("*.png") if p.parent.name != "good")
        assert (row["test_normal"], row["test_defective"]) == (len(good), len(bad))
        called = [r.is_defective for r in detector.predict(good)]  # predict's verdicts match metrics.json's rates
        assert row["fpr"] == pytest.approx(sum(called) / len(good))
        found = detector.predict(bad)
        assert row["recall"] == pytest.approx(sum(r.is_defective for r in found) / len(bad))
        assert row["unknown_rate_defective"] == pytest.approx(sum(r.is_unknown for r in found) / len(bad))
        look = sum(r.is_defective or r.is_unknown for r in found) / len(bad)
        assert row["recall_with_unknown"] == pytest.approx(look)
        silent = sum(r.task != task and not r.is_unknown for r in found)
        assert row["misrouted_not_unknown_defective"] == silent


def test_resume_keeps_the_thresholds_of_finished_tasks(positional_run, tmp_path: Path) -> None:
    """Resumed after task 1 from its checkpoint: the same routing, thresholds and verdicts as uninterrupted."""
    from train import train

    out, overrides = positional_run
    train(compose_config([*overrides, f"resume={out / 'checkpoints' / 'task_01_checker.ckpt'}"], tmp_path))
    resumed, whole = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path, out))
    for key in ("routing", "per_task", "thresholds"):
        assert resumed[key] == whole[key], key


def test_the_router_never_changes_what_the_flow_learns(positional_run, tmp_path: Path) -> None:
    """The same run with the study's prototype router: every trained tensor outside the router is bit-identical,
    and so are the oracle scores (routing only decides which expert scores an image)."""
    from train import train

    out, overrides = positional_run
    train(compose_config([*overrides, "model/router=prototype"], tmp_path))
    robust, proto = (load_checkpoint(d / "checkpoints" / "last.ckpt").model for d in (out, tmp_path))
    assert isinstance(proto.router, PrototypeRouter) and isinstance(robust.router, PositionalRouter)
    a, b = robust.state_dict(), proto.state_dict()
    shared = [k for k in a if not k.startswith("router.")]
    assert shared and set(shared) == {k for k in b if not k.startswith("router.")}
    assert all(torch.equal(a[k], b[k]) for k in shared)
    oracle = [json.loads((d / "metrics.json").read_text())["per_task"] for d in (out, tmp_path)]
    assert [r["oracle"] for r in oracle[0].values()] == [r["oracle"] for r in oracle[1].values()]


def test_the_pixel_threshold_made_in_training_comes_from_the_held_out_images_only(positional_run, synthetic_root):
    """Each task's pixel threshold is the target-FPR quantile of its held-out normals' maps, never of the images it
    trained on; metrics.json reports the test pixels' false-positive rate and recall at it."""
    from moleflow.assembly.builders import build_datamodule
    from moleflow.thresholds.fitting import pixel_threshold
    from moleflow.thresholds.held_out import holdout_split

    out, overrides = positional_run
    metrics = json.loads((out / "metrics.json").read_text())
    detector = MoLEFlowDetector.load(out / "checkpoints" / "last.ckpt", auto_calibrate=False)
    dm = build_datamodule(compose_config(overrides, out / "again").data)
    for t, task in enumerate(TASKS):
        files = [s.image_path for s in dm.train_dataset(t).samples]
        kept, held = holdout_split(len(files), 0.25, metrics["config"]["seed"] + 1000 * (t + 1))
        maps = {i: r.anomaly_map for i, r in enumerate(detector.predict(files)) if r.task == task}
        assert set(held.tolist()) <= set(maps), "held-out normals route home"
        expected, _ = pixel_threshold(torch.stack([maps[i] for i in held.tolist()]), 0.01)
        stored = detector.pixel_thresholds[task]
        assert stored == pytest.approx(expected, rel=1e-5)  # the held-out normals' quantile...
        assert detector.calibration.tasks[task].pixel_images == len(held) < len(kept)  # ...of them only
        row = metrics["thresholds"]["per_task"][task]
        assert row["pixel_threshold"] == stored and 0.0 <= row["pixel_fpr"] <= 1.0 and 0.0 <= row["pixel_recall"] <= 1.0
