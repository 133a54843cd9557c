"""Judge image files with an exported moleflow model and ONNX Runtime alone: no torch, no moleflow.

    python src/predict.py mode=export ckpt=PATH export.format=onnx      # writes moleflow_model.onnx
    python examples/onnx_predict.py moleflow_model.onnx part_001.png part_002.png

Needs numpy, Pillow and onnxruntime only. Everything the model needs besides the images is in the file's
``metadata_props`` (each value JSON): ``input`` (size, channel order, value range, mean, std), ``task_names``,
``score_thresholds`` and ``route_thresholds`` (per task; null: none). Prints one line per image: file, routed
task, score, that task's threshold and the verdict (normal, defective, unknown category).

The preprocessing here covers 8-bit images (what Pillow turns into RGB); moleflow's own reader also scales
16-bit and other deep images to 8 bits first and applies EXIF orientation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image


def read_metadata(session: ort.InferenceSession) -> dict:
    """The moleflow entries of the model's metadata_props, decoded."""
    props = session.get_modelmeta().custom_metadata_map
    keys = ("input", "task_names", "score_thresholds", "route_thresholds")
    missing = [k for k in keys if k not in props]
    if missing:
        msg = f"The model has no {missing} metadata: export it with moleflow (mode=export export.format=onnx)."
        raise SystemExit(msg)
    return {k: json.loads(props[k]) for k in keys}


def preprocess(path: Path, spec: dict) -> np.ndarray:
    """An image file -> (3, S, S) float32 as the model expects it (spec: the metadata's ``input``)."""
    if spec["channel_order"] != "RGB":
        msg = f"This example reads RGB models; the model wants {spec['channel_order']}."
        raise SystemExit(msg)
    size = int(spec["size"])
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), resample=Image.Resampling.BILINEAR)
    low, high = spec["value_range"]
    x = np.asarray(rgb, dtype=np.float32) / np.float32(255.0)  # 0..1
    if (low, high) != (0.0, 1.0):
        x = np.float32(low) + x * np.float32(high - low)
    mean = np.asarray(spec["mean"], dtype=np.float32)
    std = np.asarray(spec["std"], dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def verdict(is_unknown: bool, is_defective: bool, threshold: float | None) -> str:
    if is_unknown:
        return "unknown category"
    if threshold is None:
        return "no threshold"
    return "defective" if is_defective else "normal"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="exported .onnx file")
    parser.add_argument("images", type=Path, nargs="+", help="image files")
    parser.add_argument("--batch", type=int, default=16, help="images per run")
    args = parser.parse_args(argv)
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    meta = read_metadata(session)
    names, thresholds = meta["task_names"], meta["score_thresholds"]
    print("file\ttask\tscore\tthreshold\tverdict")
    for start in range(0, len(args.images), max(1, args.batch)):
        paths = args.images[start : start + max(1, args.batch)]
        batch = np.stack([preprocess(p, meta["input"]) for p in paths])
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"images": batch}), strict=True))
        for i, path in enumerate(paths):
            task = names[int(out["task"][i])]
            threshold = thresholds[task]
            shown = "none" if threshold is None else f"{threshold:.6g}"
            judged = verdict(bool(out["is_unknown"][i]), bool(out["is_defective"][i]), threshold)
            print(f"{path}\t{task}\t{float(out['score'][i]):.6g}\t{shown}\t{judged}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
