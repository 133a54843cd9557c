"""BSData (pitting on ball-screw drive spindles, Schlagenhauf et al. 2021) as one continual task.

Real RGB photographs of spindle surfaces with labelme polygon annotations of pitting. The layout of a git
clone of https://github.com/2Obe/BSData is

    ROOT/data/<name>.jpg      the photographs (RGB; 1130x460 or 1540x645 px for the wear series)
    ROOT/label/<name>.json    labelme annotations of the images with pitting (polygons labelled "Pitting")

An image without an annotation file is normal. Most images (names ``01_<yymmddhhmmss>_<pos>_<angle>_crop_<k>``)
follow 15 spindle positions over weeks of wear: one position's images are near-duplicates, so positions,
not images, are held out: a seeded share of the positions goes to test whole
(:func:`moleflow.data.subsets.split_groups`); the pitting images of the training positions are left out.
Pitting does not heal, so an unannotated image taken after its position's first annotated one is probably a
missed annotation: such images are left out (``drop_late_unlabelled``). The 69 images of the second
spindle type (``KGT<n>-<S|V>-<num>-A<nn>_crop_<k>``) all show pitting and look different (other sizes,
soiling), with no normal image of their kind; they are left out unless ``include_kgt`` (then as test-only
groups, one per spindle and section ``KGT<n>-A<nn>``). The clone's data/BSD/ folder (a copy) is not read.

The polygons are rasterised into PNG masks under ROOT/.moleflow_derived/bsdata-<key>/ (see
:mod:`moleflow.data.derived`), once; a polygon that marks no pixel leaves its image out, with a warning.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from moleflow.data.derived import derived_folder, input_fingerprint
from moleflow.data.folder import check_fraction, check_seed
from moleflow.data.mvtec import one_task_name
from moleflow.data.subsets import by_name, split_groups
from moleflow.data.types import GOOD, CategorySplit, DatasetLayoutError, Sample

BSDATA_TASK = "bsdata"
BSDATA_URL = "https://github.com/2Obe/BSData"
BSDATA_VERSION = 1  # of the rasterisation: a change gives a new derived folder
BSDATA_LAYOUT = (
    "Expected layout (a git clone of the BSData repository):\n"
    "  ROOT/data/<name>.jpg     photographs of ball-screw spindles\n"
    "  ROOT/label/<name>.json   labelme polygon annotations of the images with pitting\n"
    f"Get it with `git clone {BSDATA_URL} data/bsdata` (about 250 MB) and set data.root to that folder."
)
_SERIES = re.compile(r"^01_(?P<time>\d{12})_(?P<position>\d+_\d{3})_crop_\d+$")
_KGT = re.compile(r"^(?P<spindle>KGT\d+)-[A-Z]+-\d+-(?P<section>A\d+)_crop_\d+$")


def _bsdata_error(problem: str) -> DatasetLayoutError:
    msg = f"{problem}\n{BSDATA_LAYOUT}"
    return DatasetLayoutError(msg)


def bsdata_group(name: str) -> str:
    """The spindle position an image shows (its file stem decides): the group never split between train and test."""
    series = _SERIES.match(name)
    if series:
        return series.group("position")
    kgt = _KGT.match(name)
    if kgt:
        return f"{kgt.group('spindle')}-{kgt.group('section')}"
    return re.sub(r"_crop_\d+$", "", name)  # an unknown name: its own photograph


def _load_annotation(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        msg = f"Cannot read the annotation {path}: {type(err).__name__}: {err}. Re-clone the data set."
        raise DatasetLayoutError(msg) from err
    if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
        raise _bsdata_error(f"{path} is not a labelme annotation: it has no 'shapes' list.")
    return data


def rasterise(annotation: dict[str, Any], size: tuple[int, int], source: Path) -> Image.Image:
    """A 0/255 mask of ``size`` (width, height) with every polygon (and rectangle) of a labelme annotation filled."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for shape in annotation["shapes"]:
        kind = shape.get("shape_type") or "polygon"
        points = [(float(x), float(y)) for x, y in shape.get("points", [])]
        if kind == "polygon" and len(points) >= 3:
            draw.polygon(points, fill=255, outline=255)
        elif kind == "rectangle" and len(points) == 2:
            (x0, y0), (x1, y1) = points
            draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=255, outline=255)
        else:
            msg = f"{source}: cannot rasterise a labelme shape of type {kind!r} with {len(points)} point(s)."
            raise DatasetLayoutError(msg)
    return mask


def _build_masks(folder: Path, annotations: list[tuple[Path, Path]]) -> dict[str, dict[str, Any]]:
    """Rasterise each (image, annotation) pair into folder/masks/<stem>.png; the index notes the marked pixels."""
    (folder / "masks").mkdir()
    items: dict[str, dict[str, Any]] = {}
    for image, label in annotations:
        data = _load_annotation(label)
        try:
            with Image.open(image) as img:
                size = img.size
        except (OSError, ValueError, SyntaxError) as err:
            msg = f"Cannot read image {image}: {type(err).__name__}: {err}. Re-clone the data set."
            raise DatasetLayoutError(msg) from err
        declared = (data.get("imageWidth"), data.get("imageHeight"))
        if None not in declared and tuple(declared) != size:
            msg = (
                f"Annotation {label} was drawn on a {declared[0]}x{declared[1]} px image but {image} is "
                f"{size[0]}x{size[1]} px: the polygons would not line up. Re-clone the data set."
            )
            raise DatasetLayoutError(msg)
        mask = rasterise(data, size, label)
        mask.save(folder / "masks" / f"{image.stem}.png")
        labels = sorted({str(s.get("label") or "pitting").lower() for s in data["shapes"]})
        items[image.stem] = {"mask": f"masks/{image.stem}.png", "pixels": int(mask.histogram()[255]), "labels": labels}
    return items


def read_bsdata(
    root: Path | str, include_kgt: bool = False, drop_late_unlabelled: bool = True
) -> tuple[list[Sample], list[Sample]]:
    """(normal samples, pitting samples with rasterised masks) of a BSData clone, each sorted by name."""
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise _bsdata_error(f"BSData root {root} {what}.")
    image_dir, label_dir = root / "data", root / "label"
    for folder, what in ((image_dir, "the photographs"), (label_dir, "the annotations")):
        if not folder.is_dir():
            raise _bsdata_error(f"Missing folder {folder} ({what}).")
    images = {p.stem: p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() == ".jpg"}
    labels = {p.stem: p for p in label_dir.iterdir() if p.is_file() and p.suffix.lower() == ".json"}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        raise _bsdata_error(f"{len(orphans)} annotation(s) have no image in {image_dir}, e.g. {orphans[0]}.json.")
    pairs = [(images[s], labels[s]) for s in sorted(labels)]
    settings = {"inputs": input_fingerprint(root, [p for pair in pairs for p in pair])}
    folder, items = derived_folder(root, BSDATA_TASK, BSDATA_VERSION, settings, lambda out: _build_masks(out, pairs))
    first_pitting: dict[str, str] = {}
    for stem in labels:
        series = _SERIES.match(stem)
        if series and items[stem]["pixels"] > 0:
            position, time = series.group("position"), series.group("time")
            first_pitting[position] = min(time, first_pitting.get(position, time))
    normals: list[Sample] = []
    anomalous: list[Sample] = []
    empty: list[str] = []
    for stem, image in sorted(images.items()):
        series = _SERIES.match(stem)
        if series is None and not include_kgt:
            continue
        if stem not in labels:
            late = series and series.group("time") > first_pitting.get(series.group("position"), "999999999999")
            if not (drop_late_unlabelled and late):
                normals.append(Sample(image, 0, GOOD, None))
        elif items[stem]["pixels"] == 0:
            empty.append(stem)
        else:
            defect = "_".join(items[stem]["labels"])
            anomalous.append(Sample(image, 1, defect, folder / items[stem]["mask"]))
    if empty:
        warnings.warn(
            f"Left out {len(empty)} annotated BSData image(s) whose polygons mark no pixel: {', '.join(empty[:5])}.",
            UserWarning,
            stacklevel=2,
        )
    if len(normals) < 2:
        raise _bsdata_error(f"{image_dir} holds {len(normals)} image(s) without annotation; at least 2 are needed.")
    return by_name(normals), by_name(anomalous)


def _group_of(sample: Sample) -> str:
    return bsdata_group(sample.image_path.stem)


def bsdata_splits(
    root: Path | str,
    categories: Sequence[str] | None = None,
    test_group_fraction: float = 0.3,
    seed: int = 0,
    include_kgt: bool = False,
    drop_late_unlabelled: bool = True,
) -> list[CategorySplit]:
    """BSData as one task (named ``categories[0]``, default "bsdata") with rasterised masks, split by position.

    Args:
        root: The clone's folder (holding data/ and label/).
        categories: One task name (the data set is one product); None gives "bsdata".
        test_group_fraction: Seeded share of the spindle positions held out for testing, all of their images.
        seed: Seed of the split (stream keyed by the task name).
        include_kgt: Also test on the second spindle type's images (all pitting, no normal of their kind).
        drop_late_unlabelled: Leave out unannotated images taken after their position's first pitting.

    Raises:
        DatasetLayoutError: The root, a folder or an image is missing, or an annotation is unreadable.
        ValueError: More than one task name or a bad option value.
    """
    task = one_task_name(categories, BSDATA_TASK, "BSData")
    fraction = check_fraction(test_group_fraction, "test_group_fraction")
    seed = check_seed(seed)
    normals, anomalous = read_bsdata(root, bool(include_kgt), bool(drop_late_unlabelled))
    train, test = split_groups(task, normals, anomalous, _group_of, fraction, seed, f"bsdata/{task}")
    return [CategorySplit(category=task, train=train, test=test, has_masks=True)]
