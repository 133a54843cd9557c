"""Readers of KolektorSDD, BSData, PIPED and CrackForest on small generated trees in their real layouts, the
grouped split they share, the derived-file folders, the validation split, and the dev benchmark's config."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from omegaconf import OmegaConf
from PIL import Image

from moleflow.data import ContinualDataModule, DatasetLayoutError, load_mask
from moleflow.data.bsdata import bsdata_group, bsdata_splits, read_bsdata
from moleflow.data.crackforest import crackforest_photograph, crackforest_splits, load_segmentation, read_crackforest
from moleflow.data.derived import DERIVED_DIR, INDEX, derived_folder
from moleflow.data.kolektor import kolektor_part, kolektor_splits, read_kolektor
from moleflow.data.piped import piped_photograph, piped_splits, read_piped
from moleflow.data.subsets import split_groups, split_validation
from moleflow.data.types import CategorySplit, Sample

CONF_DATA = Path(__file__).resolve().parents[2] / "conf" / "data"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _groups(samples: list[Sample], group_of) -> set[str]:
    return {group_of(s) for s in samples}


def _assert_no_leak(split: CategorySplit, group_of) -> None:
    assert all(s.label == 0 and s.mask_path is None for s in split.train)
    assert not _groups(split.train, group_of) & _groups(split.test, group_of)


# ------------------------------------------------------------------------------------------ grouped split


def _sample(name: str, label: int) -> Sample:
    return Sample(Path(f"/x/{name}.png"), label, "good" if label == 0 else "defect", None if label == 0 else Path("m"))


def test_split_groups_holds_out_whole_groups_per_kind() -> None:
    # groups a..f: normals and defects; g..j: normals only; k: defects only
    normals = [_sample(f"{g}{i}", 0) for g in "abcdefghij" for i in range(3)]
    defects = [_sample(f"{g}{i}d", 1) for g in "abcdefk" for i in range(2)]

    def group(s: Sample) -> str:
        return s.image_path.name[0]

    train, test = split_groups("t", normals, defects, group, 0.5, seed=0)
    held = _groups(test, group) - {"k"}
    assert len(held & set("abcdef")) == 3 and len(held & set("ghij")) == 2  # half of each kind
    assert not _groups(train, group) & _groups(test, group)
    assert "k" in _groups(test, group)  # defect-only groups have nothing to train on: always tested
    assert {s for s in defects if group(s) in held | {"k"}} == {s for s in test if s.label}
    assert len(train) + sum(1 for s in test if s.label == 0) == len(normals)
    assert split_groups("t", normals, defects, group, 0.5, seed=0) == (train, test)
    picks = {frozenset(_groups(split_groups("t", normals, defects, group, 0.5, seed=s)[1], group)) for s in range(6)}
    assert len(picks) > 1
    # a tiny share still tests one group with defects; a huge one still trains on one group
    _, test = split_groups("t", normals, defects, group, 0.01, seed=0)
    assert any(s.label for s in test if group(s) != "k")
    train, _ = split_groups("t", normals[:6], defects[:4], group, 0.99, seed=0)
    assert train
    with pytest.raises(ValueError, match="at least 2 are needed"):
        split_groups("t", normals[:3], defects, group, 0.5, seed=0)


# ------------------------------------------------------------------------------------------ validation part


def _category(n_normal: int, n_defect: int) -> CategorySplit:
    test = [_sample(f"n{i:02d}", 0) for i in range(n_normal)] + [_sample(f"d{i:02d}", 1) for i in range(n_defect)]
    return CategorySplit("cat", train=[_sample("train", 0)], test=sorted(test, key=lambda s: s.image_path.name))


def test_split_validation_is_stratified_disjoint_and_seeded() -> None:
    split = _category(10, 4)
    validation, test = split_validation(split, 0.25, seed=0)
    assert [s.label for s in validation.test].count(0) == 3 and [s.label for s in validation.test].count(1) == 1
    assert not set(validation.test) & set(test.test) and len(validation.test) + len(test.test) == 14
    assert [s for s in split.test if s in test.test] == test.test  # order kept
    assert validation.train == test.train == split.train and validation.category == "cat"
    assert split_validation(split, 0.25, seed=0) == (validation, test)
    assert len({tuple(split_validation(split, 0.25, seed=s)[0].test) for s in range(5)}) > 1
    tiny, rest = split_validation(split, 0.01, seed=1)  # at least one of each label
    assert sorted(s.label for s in tiny.test) == [0, 1] and {0, 1} <= {s.label for s in rest.test}
    big, rest = split_validation(split, 0.99, seed=1)  # at most all but one of each label
    assert sorted(s.label for s in rest.test) == [0, 1]
    single, rest = split_validation(_category(5, 1), 0.5, seed=0)  # a lone defective image stays in test
    assert all(s.label == 0 for s in single.test) and sum(s.label for s in rest.test) == 1
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        split_validation(split, 1.0, seed=0)


# ------------------------------------------------------------------------------------------ derived folders


def test_derived_folder_is_atomic_keyed_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def build(folder: Path) -> dict[str, int]:
        calls.append(folder)
        (folder / "a.txt").write_text("x")
        return {"files": 1}

    def broken(folder: Path) -> None:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        derived_folder(tmp_path, "r", 1, {"size": 4}, broken)
    assert list((tmp_path / DERIVED_DIR).iterdir()) == []  # nothing half-written is left to trust
    one, index = derived_folder(tmp_path, "r", 1, {"size": 4}, build)
    assert index == {"files": 1} and (one / "a.txt").is_file() and (one / INDEX).is_file()
    assert derived_folder(tmp_path, "r", 1, {"size": 4}, build) == (one, index) and len(calls) == 1  # reused
    two, _ = derived_folder(tmp_path, "r", 1, {"size": 8}, build)
    three, _ = derived_folder(tmp_path, "r", 2, {"size": 4}, build)
    assert len({one, two, three}) == 3 and all(p.is_dir() for p in (one, two, three))
    # a read-only root: the files go to the user's cache, with a warning saying where
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / DERIVED_DIR).write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="is not writable.*cache"):
        cached, _ = derived_folder(ro, "r", 1, {"size": 4}, build)
    assert cached.is_relative_to(tmp_path / "cache") and (cached / "a.txt").is_file()
    assert derived_folder(ro, "r", 1, {"size": 4}, build)[0] == cached and len(calls) == 4


# ------------------------------------------------------------------------------------------ KolektorSDD

KOS_PARTS, KOS_IMAGES = 6, 3


def write_kolektor(root: Path) -> Path:
    """ROOT/data/kosNN/PartK.jpg + PartK_label.bmp; image 1 of each part defective (palette mask, as released),
    and data/kos03/kos01/, a byte-identical copy of data/kos01/ (as in the mirror)."""
    rng = _rng()
    for p in range(1, KOS_PARTS + 1):
        part = root / "data" / f"kos{p:02d}"
        part.mkdir(parents=True)
        for k in range(KOS_IMAGES):
            height = 30 + p  # sizes differ per part, as in the real data
            Image.fromarray(rng.integers(0, 255, (height, 12), dtype=np.uint8)).save(part / f"Part{k}.jpg")
            values = np.zeros((height, 12), dtype=np.uint8)
            if k == 1:
                values[10:14, 3:6] = 1
            mask = Image.new("P", (12, height))
            mask.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)  # an 8-bit palette BMP, as released
            mask.putdata(values.ravel().tolist())
            mask.save(part / f"Part{k}_label.bmp")
    shutil.copytree(root / "data" / "kos01", root / "data" / "kos03" / "kos01")
    return root


@pytest.fixture()
def kolektor_root(tmp_path: Path) -> Path:
    return write_kolektor(tmp_path / "kolektor")


def test_kolektor_reads_parts_masks_and_drops_the_copy(kolektor_root: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the byte-identical copy is dropped quietly
        normals, defects = read_kolektor(kolektor_root)
    assert len(normals) == KOS_PARTS * (KOS_IMAGES - 1) and len(defects) == KOS_PARTS
    paths = [s.image_path for s in normals + defects]
    assert len(set(paths)) == len(paths) and all(p.parent.parent == kolektor_root / "data" for p in paths)
    assert all(s.mask_path == s.image_path.with_name(f"{s.image_path.stem}_label.bmp") for s in defects)
    mask = load_mask(defects[0].mask_path, 36, None)  # the palette BMP reads as-is: index 1 is defect
    assert 0 < float(mask.sum()) < 36 * 36
    # a nested folder that is not a copy is not read either, but named
    copy = kolektor_root / "data" / "kos03" / "kos01" / "Part0.jpg"
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.warns(UserWarning, match=r"Skipped the nested folder .*kos03/kos01"):
        assert len(read_kolektor(kolektor_root)[0]) == len(normals)


def test_kolektor_split_never_shares_a_part(kolektor_root: Path) -> None:
    (split,) = kolektor_splits(kolektor_root, test_group_fraction=0.5, seed=3)
    assert split.category == "kolektor" and split.has_masks
    _assert_no_leak(split, kolektor_part)
    held = _groups(split.test, kolektor_part)
    assert len(held) == 3 and len(split.train) == 3 * (KOS_IMAGES - 1)
    assert sum(s.label for s in split.test) == 3  # the defective images of the training parts are left out
    assert kolektor_splits(kolektor_root, test_group_fraction=0.5, seed=3) == [split]
    others = {frozenset(_groups(kolektor_splits(kolektor_root, seed=s)[0].test, kolektor_part)) for s in range(5)}
    assert len(others) > 1
    with pytest.raises(ValueError, match="test_group_fraction must be strictly between"):
        kolektor_splits(kolektor_root, test_group_fraction=1.5)


def test_kolektor_masks_are_checked(kolektor_root: Path) -> None:
    mask = kolektor_root / "data" / "kos02" / "Part0_label.bmp"
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(mask)
    with pytest.raises(DatasetLayoutError, match="is 5x5 px but its image"):
        read_kolektor(kolektor_root)
    mask.unlink()
    with pytest.raises(DatasetLayoutError, match="has no mask"):
        read_kolektor(kolektor_root)


# ------------------------------------------------------------------------------------------ BSData

BS_POSITIONS = ("100000_000", "200000_090", "300000_180", "400000_270")
BS_SIZE = (40, 24)  # width, height
BS_SQUARE = [[10.0, 4.0], [20.0, 4.0], [20.0, 12.0], [10.0, 12.0]]


def _labelme(name: str, shapes: list[list[list[float]]]) -> dict:
    return {
        "version": "4.5.6",
        "flags": {},
        "shapes": [
            {"label": "Pitting", "points": p, "group_id": None, "shape_type": "polygon", "flags": {}} for p in shapes
        ],
        "imagePath": f"{name}.jpg",
        "imageData": None,
        "imageHeight": BS_SIZE[1],
        "imageWidth": BS_SIZE[0],
    }


def write_bsdata(root: Path) -> Path:
    """ROOT/data/*.jpg + ROOT/label/*.json: four positions over five times (pitting annotated at times 4 and 5 of
    the first three, none at the fourth), a late unannotated image at position 1, and one KGT image."""
    rng = _rng()
    (root / "data").mkdir(parents=True)
    (root / "label").mkdir()
    names: list[tuple[str, bool]] = []
    for p, position in enumerate(BS_POSITIONS):
        for t in range(1, 6):
            names.append((f"01_2009010{t}0000_{position}_crop_2", p < 3 and t >= 4))
    names += [("01_200901090000_100000_000_crop_1", False), ("KGT1-S-060-A02_crop_0", True)]
    for name, pitting in names:
        Image.fromarray(rng.integers(0, 255, (BS_SIZE[1], BS_SIZE[0], 3), dtype=np.uint8)).save(
            root / "data" / f"{name}.jpg"
        )
        if pitting:
            shapes = [BS_SQUARE, [[30.0, 2.0], [36.0, 2.0], [33.0, 8.0]]]
            (root / "label" / f"{name}.json").write_text(json.dumps(_labelme(name, shapes)))
    return root


@pytest.fixture()
def bsdata_root(tmp_path: Path) -> Path:
    return write_bsdata(tmp_path / "bsdata")


def test_bsdata_reads_normals_and_rasterises_polygons(bsdata_root: Path) -> None:
    normals, defects = read_bsdata(bsdata_root)
    assert len(normals) == 14 and len(defects) == 6  # the late unannotated image and the KGT image left out
    assert not any("crop_1" in s.image_path.name for s in normals)
    assert all(s.defect_type == "pitting" for s in defects)
    mask = np.asarray(Image.open(defects[0].mask_path))
    assert defects[0].mask_path.is_relative_to(bsdata_root / DERIVED_DIR) and mask.shape == BS_SIZE[::-1]
    square = np.zeros_like(mask, dtype=bool)
    square[4:13, 10:21] = True  # the polygon's vertices are pixel centres, edges included
    assert (mask[square] == 255).all() and mask[12, 21] == 0 and mask[13, 15] == 0
    assert mask[4, 33] == 255 and mask[7, 33] == 255 and mask[2, 30] == 255 and mask[20, 5] == 0  # the triangle
    assert 99 < int((mask == 255).sum()) < 99 + 30
    kept, with_kgt = read_bsdata(bsdata_root, drop_late_unlabelled=False), read_bsdata(bsdata_root, include_kgt=True)
    assert len(kept[0]) == 15 and len(with_kgt[1]) == 7


def test_bsdata_split_never_shares_a_position(bsdata_root: Path) -> None:
    (split,) = bsdata_splits(bsdata_root, test_group_fraction=0.34, seed=0)
    group = lambda s: bsdata_group(s.image_path.stem)  # noqa: E731
    _assert_no_leak(split, group)
    assert len(_groups(split.test, group)) == 1 and sum(s.label for s in split.test) == 2
    assert _groups(split.test, group) <= set(BS_POSITIONS[:3])  # the tested position has pitting
    assert bsdata_splits(bsdata_root, test_group_fraction=0.34, seed=0) == [split]
    (with_kgt,) = bsdata_splits(bsdata_root, test_group_fraction=0.34, seed=0, include_kgt=True)
    assert "KGT1-A02" in _groups(with_kgt.test, group)  # a group without normals is only ever tested
    assert bsdata_group("KGT3-S-111-A03_crop_0") == bsdata_group("KGT3-V-104-A03_crop_4") == "KGT3-A03"


def test_bsdata_masks_are_derived_once_and_redone_for_new_annotations(bsdata_root: Path) -> None:
    read_bsdata(bsdata_root)
    (first,) = (bsdata_root / DERIVED_DIR).iterdir()
    stamp = (first / INDEX).stat().st_mtime_ns
    read_bsdata(bsdata_root)
    assert [p.name for p in (bsdata_root / DERIVED_DIR).iterdir()] == [first.name]
    assert (first / INDEX).stat().st_mtime_ns == stamp
    label = sorted((bsdata_root / "label").glob("*.json"))[0]
    data = json.loads(label.read_text())
    data["shapes"] = data["shapes"][:1]
    label.write_text(json.dumps(data))
    read_bsdata(bsdata_root)
    assert len(list((bsdata_root / DERIVED_DIR).iterdir())) == 2 and (first / INDEX).is_file()


def test_bsdata_annotation_errors_name_the_file(bsdata_root: Path) -> None:
    label = sorted((bsdata_root / "label").glob("*.json"))[0]
    data = json.loads(label.read_text())
    data["imageWidth"] = 99
    label.write_text(json.dumps(data))
    with pytest.raises(DatasetLayoutError, match=rf"{label.name} was drawn on a 99x24 px image"):
        read_bsdata(bsdata_root)
    label.write_text("{not json")
    with pytest.raises(DatasetLayoutError, match=f"Cannot read the annotation .*{label.name}"):
        read_bsdata(bsdata_root)


# ------------------------------------------------------------------------------------------ PIPED

PIPED_TYPES = {"PA_AAA01_TL": "GroundThruth", "PA_BBB01_TL": "GroundTruth", "PA_CCC01_RL": "GroundThruth"}


def write_piped(root: Path) -> Path:
    """ROOT/data/PA_<T>_<L>/{NoDefects,Defects,Defects/GroundT(h)ruth}: 4 photographs x 2 normal patches and
    2 x 2 defective patches per type, 1-bit masks with the impurity black; plus PU_PNG01_TL (never read)."""
    rng = _rng()
    for folder, gt_name in PIPED_TYPES.items():
        base = root / "data" / folder
        for sub in ("NoDefects", f"Defects/{gt_name}"):
            (base / sub).mkdir(parents=True)
        for n in range(1, 5):
            for k in (1, 2):
                patch = rng.integers(100, 200, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(patch).save(base / "NoDefects" / f"{folder}_S_ND_{n:02d}_{k}.bmp")
                if n > 2:
                    continue
                patch[3:6, 4 + k : 8 + k] = 20
                Image.fromarray(patch).save(base / "Defects" / f"{folder}_S_D_{n}_{k}.bmp")
                white = np.ones((16, 16), dtype=bool)
                white[3:6, 4 + k : 8 + k] = False
                Image.fromarray(white).save(base / "Defects" / gt_name / f"{folder}_S_GT_{n}_{k}.bmp")
    other = root / "data" / "PU_PNG01_TL" / "NoDefect"
    other.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(other / "PL_PNG_1_1wo.bmp")
    return root


@pytest.fixture()
def piped_root(tmp_path: Path) -> Path:
    return write_piped(tmp_path / "piped")


def test_piped_pools_types_per_lighting_mode_with_inverted_masks(piped_root: Path) -> None:
    normals, defects = read_piped(piped_root, "piped_tl")
    assert len(normals) == 16 and len(defects) == 8  # AAA and BBB (both mask-folder spellings), not PU_PNG
    assert {s.defect_type for s in defects} == {"aaa01", "bbb01"}
    rl_normals, rl_defects = read_piped(piped_root, "piped_rl")
    assert len(rl_normals) == 8 and len(rl_defects) == 4 and {s.defect_type for s in rl_defects} == {"ccc01"}
    sample = next(s for s in defects if s.image_path.stem.endswith("_2_2"))
    mask = np.asarray(Image.open(sample.mask_path))
    expected = np.zeros((16, 16), dtype=np.uint8)
    expected[3:6, 6:10] = 255  # the black pixels of the 1-bit mask
    assert np.array_equal(mask, expected)
    assert len(list((piped_root / DERIVED_DIR).iterdir())) == 2  # one folder per lighting mode


def test_piped_split_never_shares_a_photograph(piped_root: Path) -> None:
    tl, rl = piped_splits(piped_root, test_group_fraction=0.25, seed=1)
    assert (tl.category, rl.category) == ("piped_tl", "piped_rl")
    for split, n_defects in ((tl, 8), (rl, 4)):
        _assert_no_leak(split, piped_photograph)
        assert sum(s.label for s in split.test) == n_defects  # every defective patch is tested
    assert len(_groups([s for s in tl.test if s.label == 0], piped_photograph)) == 2  # 25 % of 8 photographs
    folder = piped_root / "data" / "PA_AAA01_TL" / "NoDefects"
    one, two, other = (
        Sample(folder / f"PA_AAA01_TL_S_ND_{nk}.bmp", 0, "good", None) for nk in ("03_1", "03_2", "04_1")
    )
    assert piped_photograph(one) == piped_photograph(two) != piped_photograph(other)
    assert piped_splits(piped_root, test_group_fraction=0.25, seed=1) == [tl, rl]
    assert [s.category for s in piped_splits(piped_root, categories=["piped_rl"])] == ["piped_rl"]
    with pytest.raises(ValueError, match="Unknown PIPED task"):
        piped_splits(piped_root, categories=["piped"])


# ------------------------------------------------------------------------------------------ CrackForest

CF_SIZE = (64, 48)  # width, height: 4 x 3 tiles of 16 px


def write_crackforest(root: Path) -> Path:
    """ROOT/image/NNN.jpg + ROOT/groundTruth/NNN.mat (struct groundTruth.Segmentation, 1 = background): five
    photographs with a vertical crack in a different column each; plus an unannotated photograph."""
    rng = _rng()
    (root / "image").mkdir(parents=True)
    (root / "groundTruth").mkdir()
    for i in range(1, 6):
        segmentation = np.ones(CF_SIZE[::-1], dtype=np.uint8)
        column = 2 + 12 * i
        segmentation[:, column : column + 2] = 2
        segmentation[40:44, 2:4] = 3 if i == 5 else 1  # a second segment counts as defect too
        if i == 1:  # short horizontal cracks just above tile (y16, x48) and just below tile (y16, x32)
            segmentation[14:16, 56:64] = 2
            segmentation[32:34, 32:41] = 2
        truth = {"Segmentation": segmentation, "Boundaries": (segmentation > 1).astype(np.uint8)}
        scipy.io.savemat(root / "groundTruth" / f"{i:03d}.mat", {"groundTruth": truth})
        photo = rng.integers(90, 160, (CF_SIZE[1], CF_SIZE[0], 3), dtype=np.uint8)
        Image.fromarray(photo).save(root / "image" / f"{i:03d}.jpg")
    Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(root / "image" / "201.jpg")
    return root


@pytest.fixture()
def crackforest_root(tmp_path: Path) -> Path:
    return write_crackforest(tmp_path / "crackforest")


def test_crackforest_tiles_keep_normals_away_from_cracks(crackforest_root: Path) -> None:
    normals, cracks = read_crackforest(crackforest_root, tile_size=16, margin=4, min_defect_pixels=4)
    assert normals and cracks and "201" not in {crackforest_photograph(s) for s in normals + cracks}
    for sample in normals + cracks:
        photo = crackforest_photograph(sample)
        y, x = (int(v) for v in sample.image_path.stem.split("_y")[1].split("_x"))
        truth = load_segmentation(crackforest_root / "groundTruth" / f"{photo}.mat")
        with Image.open(crackforest_root / "image" / f"{photo}.jpg") as img:
            source = np.asarray(img.convert("RGB"))[y : y + 16, x : x + 16]
        assert np.array_equal(np.asarray(Image.open(sample.image_path)), source)  # the tile is the crop
        if sample.label == 0:
            assert not truth[max(0, y - 4) : y + 20, max(0, x - 4) : x + 20].any()  # no crack within the margin
        else:
            crop = truth[y : y + 16, x : x + 16]
            assert crop.sum() >= 4 and np.array_equal(np.asarray(Image.open(sample.mask_path)) > 0, crop)
    # photograph 1: tiles holding a crack are defective, clean tiles within 4 px of one (beside, above or below)
    # are left out, the others are normal
    first = {s.image_path.stem: s.label for s in normals + cracks if crackforest_photograph(s) == "001"}
    defective = ("y0_x0", "y16_x0", "y32_x0", "y0_x48", "y32_x32")
    assert first == {f"001_{t}": 1 for t in defective} | {"001_y0_x32": 0, "001_y32_x48": 0}
    assert any(s.image_path.stem == "005_y32_x0" for s in cracks)  # segment 3 counts as defect


def test_crackforest_split_and_derived_folders_per_setting(crackforest_root: Path) -> None:
    (split,) = crackforest_splits(crackforest_root, tile_size=16, margin=4, min_defect_pixels=4, seed=2)
    _assert_no_leak(split, crackforest_photograph)
    assert split.train and {0, 1} <= {s.label for s in split.test}
    again = crackforest_splits(crackforest_root, tile_size=16, margin=4, min_defect_pixels=4, seed=2)
    assert again == [split]
    (other,) = crackforest_splits(crackforest_root, tile_size=12, margin=2, min_defect_pixels=4, seed=2)
    folders = sorted((crackforest_root / DERIVED_DIR).iterdir())
    assert len(folders) == 2 and all((f / INDEX).is_file() for f in folders)  # both settings kept
    assert all(s.image_path.is_file() for s in split.train + split.test + other.train + other.test)
    assert {Image.open(other.train[0].image_path).size, Image.open(split.train[0].image_path).size} == {
        (12, 12),
        (16, 16),
    }
    with pytest.raises(ValueError, match="tile_size must be an int >= 8"):
        crackforest_splits(crackforest_root, tile_size=2)


def test_crackforest_bad_annotation_names_the_file(crackforest_root: Path) -> None:
    bad = crackforest_root / "groundTruth" / "003.mat"
    scipy.io.savemat(bad, {"other": np.zeros((2, 2))})
    with pytest.raises(DatasetLayoutError, match=r"Cannot read the annotation .*003\.mat"):
        read_crackforest(crackforest_root, tile_size=16)


# ------------------------------------------------------------------------------------------ all four


@pytest.mark.parametrize(
    ("source", "clone"),
    [
        ("kolektor", "git clone https://github.com/songpeixuan22/Unet-Defect-Detection-in-kolektorSSD data/kolektor"),
        ("bsdata", "git clone https://github.com/2Obe/BSData data/bsdata"),
        ("piped", "git clone https://github.com/bianconif/PIPED data/piped"),
        ("crackforest", "git clone https://github.com/cuilimeng/CrackForest-dataset data/crackforest"),
    ],
)
def test_missing_root_says_how_to_get_the_data(source: str, clone: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"(?s)does not exist.*" + clone.replace(".", r"\.")):
        ContinualDataModule(tmp_path / "nowhere", None, source=source).setup()


def test_datamodule_reads_the_new_sources_with_masks(
    kolektor_root: Path, bsdata_root: Path, piped_root: Path, crackforest_root: Path
) -> None:
    sources = [
        {"source": "kolektor", "root": str(kolektor_root)},
        {"source": "bsdata", "root": str(bsdata_root), "source_options": {"test_group_fraction": 0.34}},
        {"source": "piped", "root": str(piped_root)},
        {"source": "crackforest", "root": str(crackforest_root), "source_options": {"tile_size": 16, "margin": 4}},
    ]
    dm = ContinualDataModule(None, None, image_size=16, source="multi", sources=sources)
    assert dm.task_names == ["kolektor", "bsdata", "piped_tl", "piped_rl", "crackforest"]
    for task in range(len(dm.task_names)):
        assert dm.has_masks(task)
        test = dm.test_dataset(task)
        item = next(test[i] for i in range(len(test)) if test.samples[i].label == 1)
        assert item["image"].shape == (3, 16, 16) and 0 < float(item["mask"].sum()) < 16 * 16


def test_dev_benchmark_chains_the_sources_in_task_order() -> None:
    cfg = OmegaConf.load(CONF_DATA / "dev_benchmark.yaml")
    names = [e.get("prefix", "") + name for e in cfg.sources for name in e.categories]
    assert names == [
        "elpv_mono",
        "kolektor",
        "mvtec_bottle",
        "piped_tl",
        "magnetic_tile",
        "bsdata",
        "crackforest",
        "piped_rl",
        "elpv_poly",
    ]
    for entry in cfg.sources:
        if entry.source not in ("elpv", "mvtec"):
            assert OmegaConf.load(CONF_DATA / f"{entry.source}.yaml").source == entry.source
    assert OmegaConf.load(CONF_DATA / "mvtec_bottle.yaml").categories == ["bottle"]
