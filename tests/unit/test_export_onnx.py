"""ONNX and OpenVINO exports reproduce the Python detector within their stated tolerances, carry their metadata,
load back by their format, and the ONNX file runs with ONNX Runtime alone (examples/onnx_predict.py).

One tiny 3-task model with the robust router (positional cells + global vote: the router with ranks, the hardest
to export) and a pool_concat backbone; each format is exported once per module (about 10 s each on one core).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from moleflow.assembly.builders import build_extractor
from moleflow.config.flow import MoLEFlowConfig
from moleflow.inference import ExportError, MoLEFlowDetector, load_exported
from moleflow.inference.export import export_path, exported_format
from moleflow.inference.parity import TOLERANCES, Tolerance, parity_report
from moleflow.inference.pipeline import OUTPUTS
from moleflow.inference.runtimes import restore_infinities
from moleflow.models.moleflow import MoLEFlowModel
from tests.helpers import CONF_DIR

ROOT = CONF_DIR.parent
EXAMPLE = ROOT / "examples" / "onnx_predict.py"
TASKS = ["bright", "dark", "tinted"]
SIZE = 32


def _category(t: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """n normalised (n, 3, S, S) images of "category" t: noise around a per-category colour."""
    base = torch.zeros(3, 1, 1)
    base[t] = 1.5
    return base + 0.6 * torch.randn(n, 3, SIZE, SIZE, generator=gen)


@pytest.fixture(scope="module")
def detector() -> MoLEFlowDetector:
    return tiny_detector()


ROBUST = {"router": "positional", "router_grid": 2, "router_keep": 0.5, "router_global_vote": True}


def tiny_detector(router: dict | None = None) -> MoLEFlowDetector:
    """3 tasks, robust router (or ``router``'s settings), experts perturbed; score threshold in the widest gap of
    the test scores' middle."""
    backbone = OmegaConf.load(CONF_DIR / "model" / "backbone" / "tiny_random.yaml")
    torch.manual_seed(0)
    extractor = build_extractor(backbone, 32).eval()
    model = MoLEFlowModel(MoLEFlowConfig(embed_dim=32, ncl=1, hidden=32, lora_rank=2, **(router or ROBUST)))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in range(len(TASKS)):
            model.add_task()
            feats = extractor(_category(t, 8, gen))
            model.fit_task_statistics(t, feats)
            model.router.fit_task(t, model.router.summarize(feats))
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    det = MoLEFlowDetector(extractor, model.eval(), TASKS, image_size=SIZE, score_top_k=2, pixel_sigma=1.0)
    scores = det.run_batch(_test_images())["score"].sort().values
    gaps = scores[1:] - scores[:-1]
    middle = slice(len(gaps) // 4, 3 * len(gaps) // 4 + 1)
    i = int(gaps[middle].argmax()) + middle.start
    det.set_thresholds(score=float(scores[i] + scores[i + 1]) / 2, route=2000.0)
    return det


def _test_images() -> torch.Tensor:
    """Images of every category (another batch size than the probe's) and one far from every category."""
    gen = torch.Generator().manual_seed(11)
    far = 6.0 + _category(0, 1, gen)
    return torch.cat([_category(t, 4, gen) for t in (2, 0, 1)] + [far])


def _probe() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.cat([_category(t, 2, gen) for t in range(len(TASKS))])


@pytest.fixture(scope="module")
def onnx_file(detector: MoLEFlowDetector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime", reason="ONNX export needs pip install 'moleflow[export]'")
    pytest.importorskip("onnxscript", reason="ONNX export needs pip install 'moleflow[export]'")
    return detector.export(tmp_path_factory.mktemp("onnx") / "moleflow_model", format="onnx", check_images=_probe())


@pytest.fixture(scope="module")
def openvino_file(detector: MoLEFlowDetector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("openvino", reason="OpenVINO export needs pip install 'moleflow[export]'")
    pytest.importorskip("onnxscript", reason="OpenVINO export needs pip install 'moleflow[export]'")
    out = tmp_path_factory.mktemp("openvino") / "moleflow_model"
    return detector.export(out, format="openvino", check_images=_probe())


def _check_against_python(detector: MoLEFlowDetector, path: Path, fmt: str) -> dict:
    """Run the exported file on the test images (tensor in, then numpy in) and compare with the Python model."""
    model, meta = load_exported(path)
    images = _test_images()
    ref = detector.run_batch(images)
    got = model(images)
    assert list(got) == list(OUTPUTS) and isinstance(got["score"], torch.Tensor)
    report = parity_report(got, ref, TOLERANCES[fmt], torch.full((len(TASKS),), 2000.0, dtype=torch.float64))
    assert report["problems"] == [] and report["tied"] == [] and report["near_threshold"] == []
    assert torch.equal(got["task"].long(), ref["task"]) and set(ref["task"].tolist()) == {0, 1, 2}
    assert got["is_defective"].tolist() == ref["is_defective"].tolist()
    assert got["is_unknown"].tolist() == ref["is_unknown"].tolist() == [False] * 12 + [True]
    assert 0 < int(ref["is_defective"].sum()) < 12  # the threshold splits the known images
    tol = TOLERANCES[fmt]
    torch.testing.assert_close(got["score"], ref["score"], rtol=tol.score_rtol, atol=tol.score_atol)
    torch.testing.assert_close(got["anomaly_map"], ref["anomaly_map"], rtol=tol.score_rtol, atol=tol.score_atol)
    dist = got["distances"].to(torch.float64)
    torch.testing.assert_close(dist, ref["distances"], rtol=tol.distance_rtol, atol=tol.distance_atol)
    as_numpy = model(images[:1].numpy())  # numpy in, numpy out; a batch of one
    assert isinstance(as_numpy["score"], np.ndarray) and int(as_numpy["task"][0]) == int(ref["task"][0])
    # the metadata: in the file and next to it, with the preprocessing, thresholds and this format's tolerance
    assert meta == json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["format"] == fmt and meta["task_names"] == TASKS
    assert meta["input"]["size"] == SIZE and meta["input"]["channel_order"] == "RGB"
    assert meta["input"]["value_range"] == [0.0, 1.0] and len(meta["input"]["mean"]) == 3
    assert meta["score_thresholds"] == detector.thresholds and meta["route_thresholds"] == detector.route_thresholds
    assert meta["tolerance"]["score_rtol"] == tol.score_rtol and meta["tolerance"]["distance_rtol"] == tol.distance_rtol
    assert "two nearest routing distances" in meta["tolerance"]["routed_tasks"]
    return report


def test_onnx_export_matches_python_and_carries_its_metadata(detector: MoLEFlowDetector, onnx_file: Path) -> None:
    import onnx

    assert onnx_file.name == "moleflow_model.onnx" and exported_format(onnx_file) == "onnx"
    report = _check_against_python(detector, onnx_file, "onnx")
    assert report["errors"]["score"]["max_rel"] < 1e-5  # float64 router and float32 flow kept: near exact
    model = onnx.load(str(onnx_file))
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    props = {p.key: p.value for p in model.metadata_props}
    for key in ("input", "task_names", "score_thresholds", "route_thresholds", "tolerance", "moleflow.json"):
        assert key in props
    assert json.loads(props["score_thresholds"]) == detector.thresholds


def test_openvino_export_matches_python_within_its_looser_tolerance(
    detector: MoLEFlowDetector, openvino_file: Path
) -> None:
    assert openvino_file.suffix == ".xml" and openvino_file.with_suffix(".bin").is_file()
    assert exported_format(openvino_file) == "openvino"
    assert TOLERANCES["openvino"].distance_rtol > TOLERANCES["onnx"].distance_rtol  # float32 meets the router
    _check_against_python(detector, openvino_file, "openvino")
    assert not list(openvino_file.parent.glob(".*"))  # no temporary file (ONNX intermediate, .tmp) left behind


def test_example_runs_with_onnxruntime_alone_and_agrees_with_the_detector(
    detector: MoLEFlowDetector, onnx_file: Path, tmp_path: Path
) -> None:
    source = EXAMPLE.read_text()
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {node.module.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"torch", "moleflow"}, imported
    rng = np.random.default_rng(0)
    paths = []
    for i, colour in enumerate([(230, 120, 110), (110, 230, 120), (120, 110, 230), (90, 90, 90), (250, 250, 250)]):
        pixels = np.clip(rng.normal(colour, 40, (40, 48, 3)), 0, 255).astype(np.uint8)  # resized to 32 x 32
        paths.append(tmp_path / f"part_{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    # run in a fresh interpreter and report whether torch or moleflow got imported there
    wrapper = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as done:
    assert not done.code, done.code
print("IMPORTED", sorted(m for m in ("torch", "moleflow") if m in sys.modules))
"""
    done = subprocess.run(
        [sys.executable, "-c", wrapper, str(EXAMPLE), str(onnx_file), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "file\ttask\tscore\tthreshold\tverdict" and lines[-1] == "IMPORTED []"
    rows = [line.split("\t") for line in lines[1:-1]]
    python = detector.predict(paths)
    assert [r[0] for r in rows] == [str(p) for p in paths]
    assert [r[1] for r in rows] == [p.task for p in python]
    assert [r[4] for r in rows] == [p.verdict for p in python]
    for row, pred in zip(rows, python, strict=True):
        assert math.isclose(float(row[2]), pred.score, rel_tol=1e-4, abs_tol=1e-3)
        assert math.isclose(float(row[3]), pred.threshold, rel_tol=1e-5)


def test_benchmark_measures_every_runtime_side_by_side(
    detector: MoLEFlowDetector, onnx_file: Path, openvino_file: Path, tmp_path: Path
) -> None:
    from experiments.benchmark.exported import markdown, measure

    files = {"torchscript": detector.export(tmp_path / "model", check_images=_probe())}
    files |= {"onnx": onnx_file, "openvino": openvino_file}
    rows = measure(detector, _test_images()[:4], files, repeats=1)
    assert [r["runtime"] for r in rows] == ["Python (eager)", "TorchScript", "ONNX Runtime", "OpenVINO"]
    assert all(r["images_per_s"] > 0 and r["same_tasks"] for r in rows)
    table = markdown(rows, 4, {"pt2": "not asked for"})
    assert "| ONNX Runtime |" in table and "Machine:" in table and "skipped (not asked for)" in table


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_nearest_image_router_exports_with_parity(fmt: str, tmp_path: Path) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX export needs pip install 'moleflow[export]'")
        pytest.importorskip("onnxscript", reason="ONNX export needs pip install 'moleflow[export]'")
    detector = tiny_detector({"router": "nearest", "router_neighbors": 3})
    path = detector.export(tmp_path / "model", format=fmt, check_images=_probe())
    model, meta = load_exported(path)
    images = _test_images()
    got, ref = model(images), detector.run_batch(images)
    report = parity_report(got, ref, TOLERANCES[fmt], torch.full((len(TASKS),), 2000.0, dtype=torch.float64))
    assert report["problems"] == [] and report["tied"] == []
    assert torch.equal(got["task"].long(), ref["task"]) and set(ref["task"][:12].tolist()) == {0, 1, 2}
    assert meta["task_names"] == TASKS


# ------------------------------------------------------------------------------------- cheap: no export
def test_export_path_adds_the_format_suffix_and_refuses_a_wrong_one(tmp_path: Path) -> None:
    assert export_path(tmp_path / "moleflow_model", "onnx").name == "moleflow_model.onnx"
    assert export_path(tmp_path / "moleflow_model", "openvino").name == "moleflow_model.xml"
    assert export_path(tmp_path / "moleflow_model", "TorchScript").name == "moleflow_model.pt"
    assert export_path(tmp_path / "model.ts", "torchscript").name == "model.ts"  # found by content when loaded
    for path, fmt in (("model.pt", "onnx"), ("model.onnx", "openvino"), ("model.bin", "onnx"), ("m.xml", "pt2")):
        with pytest.raises(ExportError, match="give the path without a suffix"):
            export_path(tmp_path / path, fmt)
    with pytest.raises(ExportError, match="Unknown export format"):
        export_path(tmp_path / "m", "tflite")


def test_format_is_read_from_the_suffix_or_the_content(tmp_path: Path) -> None:
    xml = tmp_path / "model_ir"
    xml.write_text('<?xml version="1.0"?>\n<net name="x" version="11"></net>')
    assert exported_format(xml) == "openvino"
    other = tmp_path / "model_without_suffix"
    other.write_bytes(b"\x08\x0a\x12\x07pytorch")  # an ONNX protobuf renamed: refused, not guessed
    with pytest.raises(ValueError, match=r"must end in \.onnx"):
        exported_format(other)


def test_a_missing_runtime_names_the_extra_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from moleflow.inference.export import write_export

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    model = tmp_path / "m.xml"
    model.write_text("<net/>")
    with pytest.raises(ImportError, match=r"pip install 'moleflow\[export\]'"):
        load_exported(model)
    with pytest.raises(ExportError, match=r"openvino: pip install 'moleflow\[export\]'"):
        write_export(None, tmp_path / "m", {}, lambda x: x, format="openvino")  # type: ignore[arg-type]


def _outputs(tasks: list[int], dists: list[list[float]], scores: list[float], thresholds: list[float]) -> dict:
    n = len(tasks)
    return {
        "task": torch.tensor(tasks),
        "routing_distance": torch.tensor([min(d) for d in dists], dtype=torch.float64),
        "distances": torch.tensor(dists, dtype=torch.float64),
        "score": torch.tensor(scores),
        "threshold": torch.tensor(thresholds, dtype=torch.float64),
        "is_unknown": torch.zeros(n, dtype=torch.bool),
        "is_defective": torch.tensor(scores) > torch.tensor(thresholds),
        "normalized_score": torch.full((n,), 0.5, dtype=torch.float64),
        "pixel_threshold": torch.full((n,), 1.0, dtype=torch.float64),
        "defect_mask": torch.zeros(n, 4, 4, dtype=torch.bool),
        "nll_map": torch.zeros(n, 2, 2),
        "anomaly_map": torch.zeros(n, 4, 4),
        "nonfinite": torch.zeros(n, dtype=torch.int64),
    }


def test_parity_allows_other_routes_only_at_near_ties_and_other_verdicts_only_near_thresholds() -> None:
    tol = Tolerance(score_rtol=1e-3, score_atol=1e-2, distance_rtol=1e-3, distance_atol=1e-2)
    route = torch.tensor([math.inf, math.inf], dtype=torch.float64)
    ref = _outputs([0, 0, 1], [[10.0, 10.005], [10.0, 20.0], [30.0, 5.0]], [1.0, 2.0, 3.0], [1.5, 1.5, 2.9995])
    # image 0 is a near-tie (10 vs 10.005): routed elsewhere, its score is not compared
    got = _outputs([1, 0, 1], [[10.0, 10.005], [10.0, 20.0], [30.0, 5.0]], [9.0, 2.0, 3.0], [1.5, 1.5, 2.9995])
    # image 2's score is within tolerance of its threshold: another verdict is allowed
    got["is_defective"][2] = False
    report = parity_report(got, ref, tol, route)
    assert report["problems"] == [] and report["tied"] == [0] and report["near_threshold"] == [2]
    bad = _outputs([0, 1, 1], [[10.0, 10.005], [10.0, 20.0], [30.0, 5.0]], [1.0, 2.0, 3.0], [1.5, 1.5, 2.9995])
    bad["score"][2] = 3.1
    problems = parity_report(bad, ref, tol, route)["problems"]
    assert len(problems) == 2 and "routes 1 image(s)" in problems[0] and "score differs" in problems[1]
    far = _outputs([0, 0, 1], [[10.0, 10.005], [10.0, 20.0], [30.0, 5.0]], [1.0, 2.0, 3.0], [1.5, 1.5, 2.9995])
    far["is_defective"][1] = False  # 2.0 against 1.5: far from the threshold
    assert "is_defective verdict differs on 1 image(s)" in parity_report(far, ref, tol, route)["problems"][0]
    masked = _outputs([0, 0, 1], [[10.0, 10.005], [10.0, 20.0], [30.0, 5.0]], [1.0, 2.0, 3.0], [1.5, 1.5, 2.9995])
    masked["defect_mask"][1, 0, 0] = True  # map 0 against pixel threshold 1: far from it, so the mask must agree
    assert "defect_mask differs at 1 pixel(s)" in parity_report(masked, ref, tol, route)["problems"][0]


class _Decide(torch.nn.Module):
    """The router's decision alone, as the pipeline calls it."""

    def __init__(self, router: torch.nn.Module) -> None:
        super().__init__()
        self.router = router
        self.register_buffer("limits", torch.tensor([math.inf, 1.0, math.inf], dtype=torch.float64))  # "none"

    def forward(self, summaries: torch.Tensor) -> dict[str, torch.Tensor]:
        distances, task = self.router.decide(summaries, 3)
        return {"distances": distances, "task": task, "limit": self.limits.index_select(0, task)}


def test_the_vote_and_an_infinite_threshold_survive_onnx_runtime_and_float32_openvino(tmp_path: Path) -> None:
    """Where the vote overrules the cells, its choice survives a runtime that loses the one-ulp raise; "no
    threshold" (inf) comes back as inf."""
    pytest.importorskip("onnxruntime", reason="ONNX export needs pip install 'moleflow[export]'")
    pytest.importorskip("onnxscript", reason="ONNX export needs pip install 'moleflow[export]'")
    from moleflow.models.router import PositionalRouter

    router = PositionalRouter(2, grid=1, keep=1.0, global_vote=True)
    router.resize(3)
    router.means[:, 0, 0] = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    router.variances.fill_(1.0)
    router.global_router.means[:] = torch.tensor([[-9.0, -9.0], [4.0, 0.0], [1.0, 1.8]], dtype=torch.float64)
    x = torch.tensor([[1.0, 1.8], [3.9, 0.1], [0.0, 4.2]])[:, None, None, :]  # the vote overrules image 0
    ref = _Decide(router)(x)
    assert router.local_distances(x).argmin(dim=1).tolist() == [0, 1, 2] and ref["task"].tolist() == [2, 1, 2]
    path = tmp_path / "decide.onnx"
    program = torch.onnx.export(
        _Decide(router).eval(),
        (x[:2],),
        input_names=["summaries"],
        output_names=["distances", "task", "limit"],
        dynamo=True,
        dynamic_shapes={"summaries": {0: torch.export.Dim("batch", min=1)}},
    )
    program.save(str(path))
    import onnxruntime as ort

    dist, task, limit = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"summaries": x.numpy()}
    )
    assert task.tolist() == [2, 1, 2] and np.array_equal(dist, ref["distances"].numpy())  # float64 kept: exact
    assert limit.tolist() == [math.inf, 1.0, math.inf]
    if importlib.util.find_spec("openvino") is None:
        return
    import openvino as ov

    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    result = compiled({"summaries": x.numpy()})
    by_name = {
        next(n for n in port.get_names() if n in ("distances", "task", "limit")): result[port]
        for port in compiled.outputs
    }
    # float32 rounds image 0's raised distance to task 0 down onto task 2's: their argmin would say task 0
    assert by_name["task"].tolist() == [2, 1, 2]
    np.testing.assert_allclose(by_name["distances"], ref["distances"].numpy(), rtol=1e-5)
    # OpenVINO clamps an infinite float64 constant to the float32 range; the loader (restore_infinities) undoes it
    assert by_name["limit"].tolist() == [float(np.finfo(np.float32).max), 1.0, float(np.finfo(np.float32).max)]
    assert restore_infinities(by_name["limit"]).tolist() == [math.inf, 1.0, math.inf]
    assert restore_infinities(np.array([-3.5e38, 2.0])).tolist() == [-math.inf, 2.0]
