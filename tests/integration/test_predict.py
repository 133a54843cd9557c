"""Using a trained model (issue 6) on the tiny 3-task run: predict, thresholds, unknown category, export, CLI.

The tiny run's model is trained for one epoch on a random backbone: its scores say nothing about
quality, so these tests check mechanics (routing, thresholds, storage, parity), not detection rates.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from moleflow.data.images import load_rgb
from moleflow.data.synthetic import SYNTHETIC_CATEGORIES, generate_synthetic_mvtec
from moleflow.inference import (
    VERDICT_UNKNOWN,
    CalibratedCopyError,
    ExportError,
    MoLEFlowDetector,
    load_exported,
)
from moleflow.inference.runner import run_from_config
from moleflow.models.router import PrototypeRouter
from moleflow.thresholds.fitting import cross_validated_distances, f1_report, fpr_threshold, tail_threshold
from moleflow.thresholds.records import SOURCE_HELD_OUT, SOURCE_TRAINING, calibrated_path
from tests.helpers import CONF_DIR, flip_tensor_byte

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["stripes", "checker", "dots"]
UNSEEN = [c for c in SYNTHETIC_CATEGORIES if c not in TASKS]


# ------------------------------------------------------------------------------- threshold maths
def test_fpr_threshold_allows_at_most_the_target_share_above() -> None:
    scores = np.arange(1000, dtype=float)
    thr, fpr = fpr_threshold(scores, 0.01)
    assert thr == 989.0 and fpr == 0.01  # exactly 10 scores above
    thr, fpr = fpr_threshold(np.arange(12, dtype=float), 0.01)
    assert thr == 11.0 and fpr == 0.0  # fewer than 1/alpha images: the largest score
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        fpr_threshold(scores, 1.5)
    with pytest.raises(ValueError, match="not finite"):
        fpr_threshold(np.array([1.0, np.nan]), 0.01)


def test_tail_threshold_extrapolates_and_never_flags_calibration_images() -> None:
    gen = np.random.default_rng(0)
    d = gen.chisquare(50, size=200)
    thr = tail_threshold(d, 0.01)
    assert thr >= d.max()
    assert abs(np.mean(gen.chisquare(50, size=200_000) > thr) - 0.01) < 0.01  # close to the asked rate
    assert math.isinf(tail_threshold(d[:2], 0.01))  # too few images: never unknown


def test_cross_validated_distances_are_out_of_sample() -> None:
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 32, generator=gen)  # n < D: in-sample distances are all about (n-1)^2/n
    router = PrototypeRouter(32)
    router.fit_task(0, feats)
    in_sample = router.distances(feats)[:, 0]
    held_out = cross_validated_distances(feats, 1e-5)
    assert (held_out > 100 * in_sample).all()


def test_f1_report() -> None:
    rep = f1_report(np.array([1.0, 2.0, 3.0, 10.0, 11.0]), np.array([0, 0, 0, 1, 1]), threshold=2.0)
    assert rep["available"] and rep["f1_optimal"] == 1.0 and 3.0 <= rep["f1_optimal_threshold"] < 10.0
    assert rep["fpr_at_threshold"] == pytest.approx(1 / 3) and rep["recall_at_threshold"] == 1.0
    assert not f1_report(np.ones(3), np.zeros(3), None)["available"]


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tiny_run, tmp_path_factory) -> Path:
    """A private copy of the tiny run's last checkpoint (calibration writes a file next to it)."""
    _, run_dir, _ = tiny_run
    target = tmp_path_factory.mktemp("predict_ckpt") / "last.ckpt"
    shutil.copyfile(run_dir / "checkpoints" / "last.ckpt", target)
    return target


@pytest.fixture(scope="module")
def detector(ckpt: Path) -> MoLEFlowDetector:
    """Loaded with no stored thresholds: calibrates on the training images and saves the calibrated copy."""
    return MoLEFlowDetector.load(ckpt, save_calibration=True)


@pytest.fixture(scope="module")
def unseen_root(tmp_path_factory) -> Path:
    """Images of categories the model never trained on."""
    root = tmp_path_factory.mktemp("unseen")
    return generate_synthetic_mvtec(root, categories=UNSEEN, num_train=3, num_test_good=0, num_test_defect=1)


def _test_images(synthetic_root: Path, task: str, kind: str = "good") -> list[Path]:
    return sorted((synthetic_root / task / "test" / kind).glob("*.png"))


# ----------------------------------------------------------------------- thresholds, stored
def test_calibration_on_training_images_is_stored_and_reloaded(detector: MoLEFlowDetector, ckpt: Path) -> None:
    cal = detector.calibration
    assert cal is not None and list(cal.tasks) == TASKS and cal.target_fpr == 0.01
    for task in cal.tasks.values():
        assert task.score_source == SOURCE_TRAINING and task.score_images == 12
        assert task.calibration_fpr <= 0.01
        assert task.route_source == SOURCE_TRAINING and math.isfinite(task.route_threshold)
        rep = task.test_report  # the tiny run's data root has labelled test images
        assert rep["available"] and 0.0 <= rep["f1_optimal"] <= 1.0
        assert {"f1_optimal_threshold", "fpr_at_threshold", "recall_at_threshold"} <= set(rep)
        routing = rep["routing_by_label"]  # unknown-category and misrouted counts, defect-free and defective apart
        assert routing["normal"]["images"] == rep["test_normal"]
        assert routing["defective"]["images"] == rep["test_defective"]
    assert any("in-sample" in note and "optimistic" in note for note in cal.notes())

    copy = calibrated_path(ckpt)
    assert copy == ckpt.with_name("last.calibrated.ckpt") and copy.is_file()
    for path in (copy, ckpt):  # the copy itself, and the original that finds its copy by content hash
        again = MoLEFlowDetector.load(path, auto_calibrate=False)
        assert again.thresholds == detector.thresholds
        assert again.route_thresholds == detector.route_thresholds
        assert again.calibration.tasks["dots"].test_report == cal.tasks["dots"].test_report


def test_calibrated_copy_of_another_checkpoint_is_refused(tiny_run, ckpt: Path, detector, tmp_path: Path) -> None:
    _, run_dir, _ = tiny_run
    other = tmp_path / "last.ckpt"
    shutil.copyfile(run_dir / "checkpoints" / "task_01_checker.ckpt", other)
    shutil.copyfile(calibrated_path(ckpt), calibrated_path(other))
    with pytest.raises(CalibratedCopyError, match="calibrated for a different version") as err:
        MoLEFlowDetector.load(other)
    assert str(calibrated_path(other)) in str(err.value) and "recalibrate" in str(err.value)
    loaded = MoLEFlowDetector.load(other, auto_calibrate=False, recalibrate=True)
    assert loaded.calibration is None and loaded.task_names == TASKS[:2]
    with pytest.raises(RuntimeError, match="calibrate"):
        loaded.predict(torch.zeros(1, 3, 64, 64))


def test_damaged_calibrated_copy_is_an_error_unless_recalibrate(ckpt: Path, detector, synthetic_root, tmp_path) -> None:
    """predict must not quietly recalibrate in-sample and save over a copy that may hold held-out thresholds."""
    own = tmp_path / "run" / "last.ckpt"
    own.parent.mkdir()
    shutil.copyfile(ckpt, own)
    shutil.copyfile(calibrated_path(ckpt), calibrated_path(own))
    flip_tensor_byte(calibrated_path(own))
    damaged = calibrated_path(own).read_bytes()
    image = _test_images(synthetic_root, "stripes")[0]
    cfg = _predict_config([f"ckpt={own}", f"input={image}", "overlays=none", "progress=false"], tmp_path / "out")
    with pytest.raises(CalibratedCopyError, match="does not match its content hash") as err:
        run_from_config(cfg, tmp_path / "out")
    assert str(calibrated_path(own)) in str(err.value)
    assert calibrated_path(own).read_bytes() == damaged  # left as it was, for the user to look at

    cfg = _predict_config(
        [f"ckpt={own}", f"input={image}", "overlays=none", "progress=false", "calibration.recalibrate=true"],
        tmp_path / "again",
    )
    payload = run_from_config(cfg, tmp_path / "again")
    assert payload["predictions"][0]["verdict"] in ("normal", "defective")
    assert MoLEFlowDetector.load(own, auto_calibrate=False).thresholds == payload["thresholds"]["score"]  # replaced


def test_calibrate_on_held_out_normal_folder(ckpt: Path, synthetic_root: Path, tmp_path: Path) -> None:
    normals = tmp_path / "normals"
    for task in TASKS:
        (normals / task / "nested").mkdir(parents=True)
        for i, path in enumerate(_test_images(synthetic_root, task)):
            shutil.copyfile(path, normals / task / ("nested" if i % 2 else "") / f"{i}.png")
    det = MoLEFlowDetector.load(ckpt, auto_calibrate=False)
    target = tmp_path / "held_out.ckpt"
    cal = det.calibrate(normal_dir=normals, target_fpr=0.05, save=target, test_labels=False)
    for task in cal.tasks.values():
        assert task.score_source == SOURCE_HELD_OUT and task.score_images == 4
        assert task.held_out_routing == {"images": 4, "routed_to_other_task": 0, "flagged_unknown": 0}
    assert not cal.in_sample_tasks and not any("in-sample" in n for n in cal.notes())
    reloaded = MoLEFlowDetector.load(target, auto_calibrate=False)
    assert reloaded.calibration.tasks["checker"].score_source == SOURCE_HELD_OUT
    assert reloaded.thresholds == det.thresholds

    (normals / "not_a_task").mkdir()
    with pytest.raises(ValueError, match="not_a_task"):
        det.calibrate(normal_dir=normals)


# ------------------------------------------------------------------------------ predictions
def test_predict_accepts_paths_pil_arrays_and_tensors(detector: MoLEFlowDetector, synthetic_root: Path) -> None:
    path = _test_images(synthetic_root, "checker")[0]
    pil = Image.open(path).convert("RGB")
    tensor, _ = load_rgb(path, 64)
    results = detector.predict([path, pil, np.asarray(pil)], batch_size=2) + detector.predict(tensor[None])
    assert len(results) == 4
    assert {r.task for r in results} == {"checker"} and {r.task_index for r in results} == {1}
    # the same image, whichever way it came in (batch composition changes the backbone's float rounding only)
    assert max(r.score for r in results) == pytest.approx(min(r.score for r in results), rel=1e-6)
    for r in results:
        assert r.anomaly_map.shape == (64, 64) and torch.isfinite(r.anomaly_map).all()
        assert r.threshold == detector.thresholds["checker"] and not r.is_unknown
        assert r.verdict in ("normal", "defective") and r.is_defective == (r.score > r.threshold)
    big_grey = pil.convert("L").resize((150, 90))  # other size and mode: resized and replicated like training
    sixteen_bit = (np.asarray(big_grey, dtype=np.uint16) * 257).astype(np.uint16)
    res = detector.predict([big_grey, sixteen_bit])
    assert res[0].original_size == (90, 150) and res[0].score == pytest.approx(res[1].score, rel=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        detector.predict(np.zeros((3, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="64"):
        detector.predict(torch.zeros(1, 3, 32, 32))


def test_known_categories_route_home_and_unseen_ones_are_unknown(
    detector: MoLEFlowDetector, synthetic_root: Path, unseen_root: Path
) -> None:
    known = [(t, p) for t in TASKS for p in _test_images(synthetic_root, t)]
    results = detector.predict([p for _, p in known])
    assert [r.task for r in results] == [t for t, _ in known]
    assert not any(r.is_unknown for r in results)
    for r in results:
        assert r.routing_distance <= r.route_threshold

    unseen = sorted(unseen_root.rglob("*/train/good/*.png"))
    assert {p.parts[-4] for p in unseen} == set(UNSEEN)
    flagged = detector.predict(unseen)
    for r in flagged:
        assert r.is_unknown and r.verdict == VERDICT_UNKNOWN and not r.is_defective
        assert r.task in TASKS and r.routing_distance > detector.route_thresholds[r.task]
    dists = detector.run_batch(torch.stack(_tensors(unseen)))["distances"]
    route = torch.tensor([detector.route_thresholds[t] for t in TASKS], dtype=torch.float64)
    assert (dists > route).all()  # beyond EVERY task's threshold, not only the nearest one's

    detector.set_thresholds(route=math.inf)  # unknown detection off: forced onto the nearest task
    try:
        assert not any(r.is_unknown for r in detector.predict(unseen))
    finally:
        detector.clear_overrides()


def _tensors(paths: list[Path]) -> list[torch.Tensor]:
    return [load_rgb(p, 64)[0] for p in paths]


def test_threshold_overrides_global_and_per_task(detector: MoLEFlowDetector, synthetic_root: Path) -> None:
    path = _test_images(synthetic_root, "dots")[0]
    stored = detector.thresholds
    try:
        detector.set_thresholds(score=-1e9)
        assert detector.predict(path)[0].is_defective
        detector.set_thresholds(score={"dots": 1e9})
        r = detector.predict(path)[0]
        assert not r.is_defective and r.threshold == 1e9 and detector.thresholds["stripes"] == -1e9
        with pytest.raises(ValueError, match="unknown tasks"):
            detector.set_thresholds(score={"bottle": 1.0})
    finally:
        detector.clear_overrides()
    assert detector.thresholds == stored


# ----------------------------------------------------------------------------------- export
def test_torchscript_export_gives_the_python_scores(
    detector: MoLEFlowDetector, synthetic_root: Path, tmp_path: Path
) -> None:
    paths = [p for t in TASKS for kind in ("good", "blob") for p in _test_images(synthetic_root, t, kind)]
    out = detector.export(tmp_path / "model.pt", format="torchscript", check_images=paths[::5])
    module, meta = load_exported(out)
    assert meta["task_names"] == TASKS and meta["input"]["shape"] == ["B", 3, 64, 64]
    assert meta["score_thresholds"] == detector.thresholds
    assert json.loads((tmp_path / "model.pt.json").read_text())["format"] == "torchscript"
    images = torch.stack(_tensors(paths))
    ref = detector.run_batch(images)
    python = detector.predict(paths)
    for batch in (images, images[:1]):
        with torch.no_grad():
            got = module(batch)
        n = batch.shape[0]
        assert torch.equal(got["task"], ref["task"][:n])
        torch.testing.assert_close(got["score"], ref["score"][:n], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got["anomaly_map"], ref["anomaly_map"][:n], rtol=1e-4, atol=1e-3)
    assert set(ref["task"].tolist()) == {0, 1, 2}
    with torch.no_grad():
        full = module(images)
    assert full["is_defective"].tolist() == [r.is_defective for r in python]
    assert full["is_unknown"].tolist() == [r.is_unknown for r in python]
    with pytest.raises(ExportError, match="writes '.onnx' files"):  # a suffix it would not be loaded back by
        detector.export(tmp_path / "model.pt", format="onnx")


def test_mode_export_onnx_writes_the_onnx_file_that_onnx_runtime_runs(
    ckpt: Path, detector: MoLEFlowDetector, synthetic_root: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime", reason="ONNX export needs pip install 'moleflow[export]'")
    pytest.importorskip("onnxscript", reason="ONNX export needs pip install 'moleflow[export]'")
    cfg = _predict_config([f"ckpt={ckpt}", "mode=export", "export.format=onnx"], tmp_path / "export")
    exported = run_from_config(cfg, tmp_path / "export")
    assert exported["exported"] == str(tmp_path / "export" / "moleflow_model.onnx")  # the format's suffix
    assert exported["files"] == [exported["exported"]] and Path(exported["metadata"]).is_file()
    model, meta = load_exported(exported["exported"])
    assert meta["format"] == "onnx" and meta["score_thresholds"] == detector.thresholds
    images = torch.stack(_tensors([p for t in TASKS for p in _test_images(synthetic_root, t)]))
    got, ref = model(images), detector.run_batch(images)
    assert torch.equal(got["task"], ref["task"]) and got["is_defective"].tolist() == ref["is_defective"].tolist()
    torch.testing.assert_close(got["score"], ref["score"], rtol=1e-4, atol=1e-3)


@pytest.mark.slow
def test_pt2_export_gives_the_python_scores(detector: MoLEFlowDetector, synthetic_root: Path, tmp_path: Path) -> None:
    paths = [p for t in TASKS for p in _test_images(synthetic_root, t)]
    module, meta = load_exported(detector.export(tmp_path / "model.pt2", format="pt2", check_images=paths))
    images = torch.stack(_tensors(paths))
    got, ref = module(images), detector.run_batch(images)
    assert meta["format"] == "pt2" and torch.equal(got["task"], ref["task"])
    torch.testing.assert_close(got["score"], ref["score"], rtol=1e-4, atol=1e-3)


def test_predict_follows_symlinked_folders_and_lists_every_skipped_file(
    ckpt: Path, detector: MoLEFlowDetector, synthetic_root: Path, tmp_path: Path
) -> None:
    image = _test_images(synthetic_root, "stripes")[0]
    outside = tmp_path / "elsewhere" / "camera_c"
    outside.mkdir(parents=True)
    shutil.copyfile(image, outside / "c.png")
    inp = tmp_path / "input"
    (inp / "real_dir").mkdir(parents=True)
    shutil.copyfile(image, inp / "a.png")
    shutil.copyfile(image, inp / "real_dir" / "b.png")
    (inp / "outside_link").symlink_to(outside, target_is_directory=True)  # followed
    (inp / "another_name").symlink_to(inp / "real_dir", target_is_directory=True)  # same folder twice
    (inp / "real_dir" / "loop").symlink_to(inp, target_is_directory=True)  # a loop
    (inp / "dangling.png").symlink_to(tmp_path / "gone.png")
    shutil.copyfile(image, inp / ".hidden.png")
    (inp / "notes.txt").write_text("not an image")
    cfg = _predict_config([f"ckpt={ckpt}", f"input={inp}", "overlays=none", "progress=false"], tmp_path / "out")
    payload = run_from_config(cfg, tmp_path / "out")
    assert [row["file"] for row in payload["predictions"]] == ["a.png", "outside_link/c.png", "real_dir/b.png"]
    skipped = {item["file"]: item["reason"] for item in payload["skipped"]}
    assert set(skipped) == {"another_name", "real_dir/loop", "dangling.png", ".hidden.png", "notes.txt"}
    assert "already searched as" in skipped["another_name"] and "already searched as" in skipped["real_dir/loop"]
    assert skipped["dangling.png"] == f"broken symlink to {tmp_path / 'gone.png'}"
    assert "hidden" in skipped[".hidden.png"] and "not an image file extension (.txt" in skipped["notes.txt"]
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["skipped"] == payload["skipped"]


# -------------------------------------------------------------------------------------- CLI
def _predict_config(overrides: list[str], output_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("predict", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(output_dir)
    HydraConfig().set_config(cfg)
    GlobalHydra.instance().clear()
    return cfg


def test_predict_cli_on_a_folder(
    ckpt: Path, detector: MoLEFlowDetector, synthetic_root: Path, unseen_root: Path, tmp_path: Path
) -> None:
    own = tmp_path / "run" / "last.ckpt"  # this test recalibrates: its own copy (with the calibrated one)
    own.parent.mkdir()
    shutil.copyfile(ckpt, own)
    shutil.copyfile(calibrated_path(ckpt), calibrated_path(own))
    ckpt = own
    inp = tmp_path / "line_images"
    (inp / "shift_2" / "cam_b").mkdir(parents=True)
    shutil.copyfile(_test_images(synthetic_root, "stripes")[0], inp / "a_stripes.png")
    shutil.copyfile(_test_images(synthetic_root, "dots", "scratch")[0], inp / "shift_2" / "cam_b" / "b_dots.png")
    Image.open(_test_images(synthetic_root, "checker")[1]).resize((200, 120)).save(inp / "shift_2" / "c_checker.jpg")
    shutil.copyfile(sorted(unseen_root.rglob("train/good/*.png"))[0], inp / "d_unseen.png")
    (inp / "e_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (inp / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "src" / "predict.py"), f"ckpt={ckpt}", f"input={inp}", f"hydra.run.dir={out}"]
    proc = subprocess.run([*cmd, "progress=false"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "e_broken.png" in proc.stdout  # listed at the end

    rows = {row["file"]: row for row in csv.DictReader((out / "predictions.csv").open())}
    assert set(rows) == {
        "a_stripes.png",
        "shift_2/cam_b/b_dots.png",
        "shift_2/c_checker.jpg",
        "d_unseen.png",
        "e_broken.png",
    }
    assert rows["e_broken.png"]["verdict"] == "unreadable" and rows["e_broken.png"]["error"]
    assert rows["a_stripes.png"]["task"] == "stripes" and rows["a_stripes.png"]["verdict"] in ("normal", "defective")
    assert (
        rows["shift_2/c_checker.jpg"]["task"] == "checker" and rows["shift_2/c_checker.jpg"]["original_width"] == "200"
    )
    assert rows["d_unseen.png"]["verdict"] == VERDICT_UNKNOWN
    for name, row in rows.items():
        if row["verdict"] != "unreadable":
            assert (out / row["overlay"]).is_file(), name
            assert float(row["threshold"]) == pytest.approx(detector.thresholds[row["task"]])
            rule = "route threshold of" if row["verdict"] == VERDICT_UNKNOWN else "score threshold of"
            assert row["decided_by"].startswith(f"{rule} {row['task']}"), row["decided_by"]
    assert rows["a_stripes.png"]["overlay"] == "overlays/a_stripes.png"  # not a_stripes.png.png
    assert rows["shift_2/c_checker.jpg"]["overlay"] == "overlays/shift_2/c_checker.png"
    payload = json.loads((out / "predictions.json").read_text())
    assert payload["counts"]["unreadable"] == 1 and payload["unreadable"][0]["file"] == "e_broken.png"
    assert payload["counts"][VERDICT_UNKNOWN] >= 1 and sum(payload["counts"].values()) == 5
    assert payload["calibration"]["tasks"]["stripes"]["score_source"] == SOURCE_TRAINING
    assert any("in-sample" in n for n in payload["notes"])

    # calibrate mode, Hydra-free, with a per-task override of the score threshold afterwards
    cal_out = tmp_path / "cal"
    normals = tmp_path / "normals" / "dots"
    normals.mkdir(parents=True)
    for path in _test_images(synthetic_root, "dots"):
        shutil.copyfile(path, normals / path.name)
    cfg = _predict_config(
        [
            f"ckpt={ckpt}",
            "mode=calibrate",
            f"calibration.normal_dir={normals.parent}",
            "calibration.test_labels=false",
            "progress=false",
        ],
        cal_out,
    )
    summary = run_from_config(cfg, cal_out)
    assert summary["tasks"]["dots"]["score_source"] == SOURCE_HELD_OUT
    assert summary["tasks"]["stripes"]["score_source"] == SOURCE_TRAINING  # no folder: training images
    assert json.loads((cal_out / "calibration.json").read_text())["calibrated_checkpoint"].endswith(
        "last.calibrated.ckpt"
    )
    cfg = _predict_config(
        [f"ckpt={ckpt}", f"input={inp / 'a_stripes.png'}", "thresholds={stripes: -1.0e9}", "overlays=none"],
        tmp_path / "one",
    )
    one = run_from_config(cfg, tmp_path / "one")
    assert one["predictions"][0]["verdict"] == "defective" and one["predictions"][0]["overlay"] is None
    assert one["calibration"]["tasks"]["dots"]["score_source"] == SOURCE_HELD_OUT  # the copy was updated

    cfg = _predict_config([f"ckpt={ckpt}", "mode=export", "threshold=50.0"], tmp_path / "export")
    exported = run_from_config(cfg, tmp_path / "export")
    module, meta = load_exported(exported["exported"])
    assert Path(exported["exported"]) == tmp_path / "export" / "moleflow_model.pt" and meta["format"] == "torchscript"
    assert meta["score_thresholds"] == dict.fromkeys(TASKS, 50.0)  # overrides are baked into the export
    with torch.no_grad():
        assert module(torch.stack(_tensors([inp / "d_unseen.png"])))["is_unknown"].item()


def test_output_names_drop_the_extension_unless_two_inputs_would_clash() -> None:
    from moleflow.inference.runner import clashing_stems, output_name

    inputs = [Path("a.png"), Path("sub/b.jpg"), Path("sub/c.jpg"), Path("sub/c.png")]
    clashing = clashing_stems(inputs)
    assert [str(output_name(p, clashing)) for p in inputs] == ["a.png", "sub/b.png", "sub/c.jpg.png", "sub/c.png.png"]


def test_the_unknown_rule_is_the_routed_task_s_own_threshold() -> None:
    from moleflow.thresholds.fitting import outside_own_route

    d = torch.tensor([[5.0, 3.0], [1.0, 9.0], [4.0, 6.0]], dtype=torch.float64)
    route = torch.tensor([2.0, 10.0], dtype=torch.float64)
    # image 0 goes to task 1 (3 <= 10): known; image 1 to task 0 (1 <= 2): known; image 2 to task 0 (4 > 2):
    # unknown, although task 1's threshold (10) covers its distance 6 (the old all-tasks rule called it known)
    assert outside_own_route(d, route).tolist() == [False, False, True]


def test_a_later_calibration_wins_over_thresholds_made_in_training(
    ckpt: Path, detector: MoLEFlowDetector, synthetic_root: Path, tmp_path: Path, caplog
) -> None:
    """A checkpoint that carries thresholds made in training, then calibrated on purpose on new normals: the new
    thresholds judge, and the log says which are in use (they used to lose silently to the training ones)."""
    import logging

    from moleflow.thresholds.calibrator import write_calibrated_checkpoint

    trained = tmp_path / "run" / "last.ckpt"
    trained.parent.mkdir()
    write_calibrated_checkpoint(ckpt, detector.calibration, trained)  # thresholds carried by the checkpoint itself
    normals = tmp_path / "normals"
    for task in TASKS:
        (normals / task).mkdir(parents=True)
        for path in _test_images(synthetic_root, task):
            shutil.copyfile(path, normals / task / path.name)
    later = MoLEFlowDetector.load(trained, auto_calibrate=False)
    assert later.thresholds == detector.thresholds
    new = later.calibrate(normal_dir=normals, save=True, test_labels=False)
    assert new.tasks["dots"].score_threshold != detector.calibration.tasks["dots"].score_threshold
    with caplog.at_level(logging.INFO, logger="moleflow.inference"):
        again = MoLEFlowDetector.load(trained, auto_calibrate=False)
    assert again.thresholds == {n: t.score_threshold for n, t in new.tasks.items()}
    assert any("not those made in training" in r.getMessage() for r in caplog.records)


def test_the_mask_written_is_the_map_above_the_pixel_threshold(
    detector: MoLEFlowDetector, synthetic_root: Path, tmp_path: Path
) -> None:
    from torch.nn import functional as F

    from moleflow.inference.runner import predict_folder

    inp = tmp_path / "parts"
    inp.mkdir()
    Image.open(_test_images(synthetic_root, "dots", "scratch")[0]).resize((96, 80)).save(inp / "scratched.png")
    shutil.copyfile(_test_images(synthetic_root, "stripes")[0], inp / "clean.png")
    payload = predict_folder(detector, inp, tmp_path / "out", overlays="all", progress=False)
    rows = {Path(r["file"]).name: r for r in payload["predictions"]}
    for name, row in rows.items():
        (pred,) = detector.predict([inp / name])
        assert pred.pixel_threshold == detector.pixel_thresholds[pred.task] and pred.pixel_threshold is not None
        above = pred.anomaly_map > pred.pixel_threshold
        assert torch.equal(pred.defect_mask, above if not pred.is_unknown else torch.zeros_like(above))
        written = np.asarray(Image.open(tmp_path / "out" / row["mask"])) > 127
        h, w = pred.original_size
        expected = F.interpolate(above[None, None].float(), size=(h, w), mode="nearest")[0, 0].numpy() > 0.5
        assert written.shape == (h, w) and np.array_equal(written, expected & (not pred.is_unknown))
        assert row["defect_area_px"] == int(written.sum())
        assert 0.0 <= row["normalized_score"] <= 1.0 and (row["normalized_score"] > 0.5) == (
            pred.score > pred.threshold
        )
    assert rows["scratched.png"]["mask"] == "masks/scratched.png"


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_predict_on_an_exported_model_gives_the_checkpoints_verdicts_files_and_csv(
    ckpt: Path, detector: MoLEFlowDetector, synthetic_root: Path, tmp_path: Path, fmt: str
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX export needs pip install 'moleflow[export]'")
        pytest.importorskip("onnxscript", reason="ONNX export needs pip install 'moleflow[export]'")
    inp = tmp_path / "input"
    for task in TASKS:
        (inp / task).mkdir(parents=True)
        for path in sorted((synthetic_root / task / "test").glob("*/*.png"))[:4]:  # defects, then good
            shutil.copyfile(path, inp / task / f"{path.parent.name}_{path.name}")
    common = [f"input={inp}", "overlays=flagged", "progress=false"]
    first = run_from_config(_predict_config([f"ckpt={ckpt}", *common], tmp_path / "first"), tmp_path / "first")
    middle = float(np.median([r["score"] for r in first["predictions"]]))  # some images of each verdict
    chosen = [f"threshold={middle}", "route_threshold=1e9"]
    cfg = _predict_config([f"ckpt={ckpt}", "mode=export", f"export.format={fmt}", *chosen], tmp_path / "export")
    exported = run_from_config(cfg, tmp_path / "export")["exported"]
    ref = run_from_config(_predict_config([f"ckpt={ckpt}", *common, *chosen], tmp_path / "ref"), tmp_path / "ref")
    got = run_from_config(_predict_config([f"ckpt={exported}", *common], tmp_path / "got"), tmp_path / "got")
    assert got["checkpoint"] == exported and got["calibration"] is None  # thresholds baked into the file
    assert ref["counts"]["normal"] > 0 and ref["counts"]["defective"] > 0
    assert got["thresholds"] == ref["thresholds"] and got["tasks"] == TASKS
    assert [r["file"] for r in got["predictions"]] == [r["file"] for r in ref["predictions"]]
    assert len(got["predictions"]) == 12 and got["counts"] == ref["counts"]
    for g, r in zip(got["predictions"], ref["predictions"], strict=True):
        assert (g["verdict"], g["task"], g["overlay"], g["mask"]) == (r["verdict"], r["task"], r["overlay"], r["mask"])
        assert g["score"] == pytest.approx(r["score"], rel=1e-4, abs=1e-3)
    ref_csv = (tmp_path / "ref" / "predictions.csv").read_text().splitlines()
    got_csv = (tmp_path / "got" / "predictions.csv").read_text().splitlines()
    assert got_csv[0] == ref_csv[0] and len(got_csv) == len(ref_csv)
    masks = {
        run: sorted(p.relative_to(tmp_path / run) for p in (tmp_path / run).rglob("masks/**/*.png"))
        for run in ("ref", "got")
    }
    assert masks["ref"] and masks["ref"] == masks["got"]

    calibrate = _predict_config([f"ckpt={exported}", "mode=calibrate"], tmp_path / "c")
    with pytest.raises(ValueError, match="needs the training checkpoint"):
        run_from_config(calibrate, tmp_path / "c")
    override = _predict_config([f"ckpt={exported}", *common, "threshold=1.0"], tmp_path / "t")
    with pytest.raises(ValueError, match="baked into it"):
        run_from_config(override, tmp_path / "t")
