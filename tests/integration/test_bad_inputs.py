"""Bad inputs through the real entry point: each is handled, or refused with our own message naming what is wrong.

A. Malformed MVTec-style trees (built by damaging a generated one) run through ``train(cfg)``.
B. Impossible settings: refused before anything heavy runs (``validate_config``,
   ``check_backbone_accepts``; the lead wires both into ``run_continual``).
C. Checkpoints: truncated or foreign files, a kill while saving, resuming with another model.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from PIL import Image
from torch import nn

import moleflow.assembly.checkpoint_files as checkpoint_module
from moleflow.assembly.checkpoint_files import CheckpointError, link_checkpoint, read_checkpoint_info
from moleflow.assembly.probes import check_backbone_accepts
from moleflow.config.checks import config_problems, validate_config
from moleflow.config.typed import job_settings
from moleflow.data.images import ImageReadError
from moleflow.data.synthetic import generate_synthetic_mvtec
from moleflow.data.types import DatasetLayoutError
from moleflow.models.feature_extractor import BackboneLoadError, FeatureExtractor
from moleflow.training.module_checkpoints import load_checkpoint, save_checkpoint
from moleflow.training.resume import check_compatible
from tests.helpers import CONF_DIR, TINY_OVERRIDES, compose_config

MOLEFLOW_DIR = Path(checkpoint_module.__file__).resolve().parents[1]  # src/moleflow
OUR_ERRORS = (DatasetLayoutError, ImageReadError, ValueError, FileNotFoundError)
CAT = "stripes"
# one small task on 32 px images: every run here takes well under a second on 2 CPU cores
SMALL_RUN = [
    *TINY_OVERRIDES,
    "data=mvtec",
    "data.image_size=32",
    "data.num_workers=0",
    "data.train_batch_size=4",
    "data.eval_batch_size=8",
    "report.figures=false",
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated one-category tree (4 train, 2 good + 1 per defect type), copied by each test before damage."""
    root = tmp_path_factory.mktemp("pristine")
    return generate_synthetic_mvtec(
        root, categories=[CAT], image_size=32, num_train=4, num_test_good=2, num_test_defect=1
    )


@pytest.fixture
def tree(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the generated tree that the test may break."""
    return Path(shutil.copytree(pristine, tmp_path / "data"))


@functools.cache
def _composed(base: tuple[str, ...]) -> DictConfig:
    return compose_config(list(base), Path("/unset"))


def _compose(base: Sequence[str], overrides: Sequence[str], out: Path) -> DictConfig:
    """``compose_config([*base, *overrides], out)``, composing ``base`` only once per module (0.1 s each).

    The overrides are parsed by Hydra's own parser (``true``, ``nan``, ``[a,b]``, ``null`` as on the
    command line) and must name existing keys; test_fast_composition_equals_hydra checks the equivalence.
    """
    cfg = copy.deepcopy(_composed(tuple(base)))
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=False)
    with read_write(cfg.hydra), open_dict(cfg):  # set_config left the cached hydra node read-only
        cfg.hydra.overrides.task = [*cfg.hydra.overrides.task, *overrides]
        cfg.hydra.runtime.output_dir = str(out)
        cfg.paths.output_dir = str(out)
    HydraConfig().set_config(cfg)
    return cfg


def _config(root: Path, out: Path, categories: str = f"[{CAT}]", extra: Sequence[str] = ()) -> DictConfig:
    return _compose(SMALL_RUN, [f"data.root={root}", f"data.categories={categories}", *extra], out)


def test_fast_composition_equals_hydra(pristine: Path, tmp_path: Path) -> None:
    extra = ["ncl=-1", "tail_weight=nan", "data.categories=[stripes,stripes]", "model.optimizer.lr=null"]
    fast = _config(pristine, tmp_path, extra=extra)
    slow = compose_config([*SMALL_RUN, f"data.root={pristine}", *extra], tmp_path)
    assert fast.hydra.overrides.task[-len(extra) :] == slow.hydra.overrides.task[-len(extra) :]
    fast, slow = ({k: v for k, v in OmegaConf.to_container(c).items() if k != "hydra"} for c in (fast, slow))
    assert str(fast) == str(slow)  # compared as text: nan != nan


def _train(cfg) -> dict:
    from train import train

    return train(cfg)


def _frames(err: BaseException) -> list[traceback.FrameSummary]:
    return traceback.extract_tb(err.__traceback__)


def _raised_by_moleflow(err: BaseException) -> bool:
    """The raising frame is our code (so the message is ours), not torch's, PIL's or timm's."""
    return Path(_frames(err)[-1].filename).resolve().is_relative_to(MOLEFLOW_DIR)


def _during_extraction(err: BaseException) -> bool:
    return any(f.name == "extract_features" and f.filename.endswith("feature_cache.py") for f in _frames(err))


# ------------------------------------------------------------------------ A. malformed data sets
def _empty_train_good(root: Path) -> Path:
    folder = root / CAT / "train" / "good"
    for p in folder.iterdir():
        p.unlink()
    (folder / "readme.txt").write_text("images went missing")  # a non-image file does not count
    return folder


def _defect_without_masks(root: Path) -> Path:
    shutil.rmtree(root / CAT / "ground_truth" / "scratch")
    return root / CAT / "test" / "scratch" / "000.png"


def _mask_of_wrong_size(root: Path) -> Path:
    mask = root / CAT / "ground_truth" / "scratch" / "000_mask.png"
    Image.new("L", (16, 16), 255).save(mask)
    return mask


def _non_image_files(root: Path) -> None:
    folder = root / CAT / "train" / "good"
    (folder / "notes.txt").write_text("taken on Monday")
    (folder / "Thumbs.db").write_bytes(b"\x00" * 64)
    (folder / ".DS_Store").write_bytes(b"\x00Bud1")
    (folder / "labels.csv").write_text("name,label\n000.png,0\n")
    (folder / "subfolder").mkdir()
    shutil.copy(folder / "000.png", folder / "subfolder" / "nested.png")  # sub-folders are not scanned
    (root / CAT / "test" / "good" / "README.md").write_text("normal test images")


def _truncated_png(root: Path) -> Path:
    image = root / CAT / "train" / "good" / "001.png"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    return image


def _zero_byte_png(root: Path) -> Path:
    image = root / CAT / "train" / "good" / "002.png"
    image.write_bytes(b"")
    return image


def _text_named_png(root: Path) -> Path:
    image = root / CAT / "test" / "good" / "001.png"
    image.write_text("<html>404 Not Found</html>")  # what a failed download leaves behind
    return image


def _mixed_modes(root: Path) -> None:
    """Grey, RGBA, 16-bit grey, palette and 1-bit images mixed into train/good and test/good."""
    train, test = root / CAT / "train" / "good", root / CAT / "test" / "good"
    rgb = Image.open(train / "000.png").convert("RGB")
    rgb.convert("L").save(train / "001.png")
    rgb.convert("RGBA").save(train / "002.png")
    grey16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(grey16).save(train / "003.png")  # mode I;16
    rgb.convert("P").save(train / "004.png")
    rgb.convert("1").save(train / "005.png")
    rgb.save(train / "006.jpg", quality=90)
    rgb.convert("L").save(test / "000.png")
    rgb.convert("RGBA").save(test / "001.png")


def _unreadable_mask(root: Path) -> Path:
    mask = root / CAT / "ground_truth" / "scratch" / "000_mask.png"
    mask.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a PNG signature, then nothing usable
    return mask


def _broken_image_symlink(root: Path) -> Path:
    link = root / CAT / "train" / "good" / "999.png"
    link.symlink_to(root / "moved_elsewhere.png")  # a data set copied without its link targets
    return link


def _cmyk_and_exif_rotated(root: Path) -> None:
    """A CMYK TIFF and a camera JPEG stored sideways (EXIF orientation 6) among the normal images."""
    train = root / CAT / "train" / "good"
    rgb = Image.open(train / "000.png").convert("RGB")
    rgb.convert("CMYK").save(train / "001.tif")
    (train / "001.png").unlink()
    sideways = rgb.transpose(Image.Transpose.ROTATE_90)
    exif = sideways.getexif()
    exif[0x0112] = 6
    sideways.save(train / "002.jpg", exif=exif, quality=95)
    (train / "002.png").unlink()


def _different_sizes(root: Path) -> None:
    train = root / CAT / "train" / "good"
    Image.open(train / "000.png").resize((48, 40)).save(train / "000.png")  # not square
    Image.open(train / "001.png").resize((20, 20)).save(train / "001.png")  # smaller than image_size
    Image.open(train / "002.png").resize((100, 70)).save(train / "002.png")
    image = root / CAT / "test" / "scratch" / "000.png"
    mask = root / CAT / "ground_truth" / "scratch" / "000_mask.png"
    Image.open(image).resize((50, 30)).save(image)  # image and its mask resized together: still a pair
    Image.open(mask).resize((50, 30), Image.Resampling.NEAREST).save(mask)


def _upper_case_extensions(root: Path) -> None:
    train = root / CAT / "train" / "good"
    (train / "000.png").rename(train / "000.PNG")
    (train / "001.png").rename(train / "001.Png")


def _empty_test_folder(root: Path) -> Path:
    test = root / CAT / "test"
    shutil.rmtree(test)
    test.mkdir()
    return test


def _empty_test_subfolders(root: Path) -> Path:
    test = root / CAT / "test"
    for image in test.rglob("*.png"):
        image.unlink()
    return test


def _missing_test_folder(root: Path) -> Path:
    shutil.rmtree(root / CAT / "test")
    return root / CAT / "test"


def _missing_root(root: Path) -> Path:
    shutil.rmtree(root)
    return root


def _root_is_a_file(root: Path) -> Path:
    shutil.rmtree(root)
    root.write_text("not a folder")
    return root


def _unknown_category(root: Path) -> Path:
    return root / "no_such_category"


def _duplicated_category(root: Path) -> str:
    return f"'{CAT}' appears more than once"


def _test_without_defects(root: Path) -> None:
    for defect in ("scratch", "blob"):
        shutil.rmtree(root / CAT / "test" / defect)


@dataclass(frozen=True)
class BadTree:
    """How to break the tree; the error to expect (None: the run must finish) and what its message names."""

    damage: Callable[[Path], Path | str | None]
    raises: type[BaseException] | None = None
    when_loaded: bool = False  # only found when the file is read: during feature extraction
    categories: str = f"[{CAT}]"
    extra: tuple[str, ...] = ()


BAD_TREES = {
    "empty_train_good": BadTree(_empty_train_good, DatasetLayoutError),
    "defect_folder_without_masks": BadTree(_defect_without_masks, DatasetLayoutError),
    "mask_of_wrong_size": BadTree(_mask_of_wrong_size, ValueError),  # caught by the scan, before training
    "non_image_files_in_train_good": BadTree(_non_image_files),
    "truncated_png": BadTree(_truncated_png, ImageReadError, when_loaded=True),
    "zero_byte_png": BadTree(_zero_byte_png, ImageReadError, when_loaded=True),
    "text_file_named_png": BadTree(_text_named_png, ImageReadError, when_loaded=True),
    "unreadable_mask": BadTree(_unreadable_mask, ImageReadError),  # named by the scan, before training
    "broken_image_symlink": BadTree(_broken_image_symlink, DatasetLayoutError),
    "grey_rgba_16bit_palette_jpeg_mixed": BadTree(_mixed_modes),
    "cmyk_and_exif_rotated": BadTree(_cmyk_and_exif_rotated),
    "images_of_different_sizes": BadTree(_different_sizes),
    "upper_case_extensions": BadTree(_upper_case_extensions),
    "unknown_category": BadTree(_unknown_category, DatasetLayoutError, categories=f"[{CAT},no_such_category]"),
    "duplicated_category": BadTree(_duplicated_category, ValueError, categories=f"[{CAT},{CAT}]"),
    "empty_test_folder": BadTree(_empty_test_folder, DatasetLayoutError),
    "test_subfolders_without_images": BadTree(_empty_test_subfolders, DatasetLayoutError),
    "missing_test_folder": BadTree(_missing_test_folder, DatasetLayoutError),
    "test_folder_without_defects": BadTree(_test_without_defects),
    "missing_root": BadTree(_missing_root, DatasetLayoutError),
    "root_is_a_file": BadTree(_root_is_a_file, DatasetLayoutError),
}


@pytest.mark.parametrize("case", list(BAD_TREES.values()), ids=list(BAD_TREES))
def test_malformed_dataset_is_handled_or_named(case: BadTree, tree: Path, tmp_path: Path) -> None:
    named = case.damage(tree)
    cfg = _config(tree, tmp_path / "out", case.categories, case.extra)
    if case.raises is None:
        payload = _train(cfg)
        assert payload["status"] == "finished"
        row = payload["per_task"][CAT]
        assert row["nonfinite_scores"] == {"routed": 0, "oracle": 0}
        assert json.loads((tmp_path / "out" / "metrics.json").read_text())["status"] == "finished"
        return
    with pytest.raises(case.raises) as info:
        _train(cfg)
    err = info.value
    assert isinstance(err, OUR_ERRORS)
    assert str(named) in str(err), f"the message does not name {named}: {err}"
    assert _raised_by_moleflow(err), f"raised from {_frames(err)[-1].filename}, not by moleflow: {err!r}"
    assert _during_extraction(err) == case.when_loaded


def test_unreadable_image_is_named_through_a_worker_process(tree: Path, tmp_path: Path) -> None:
    """With DataLoader workers the error crosses a process boundary: its type and our message survive."""
    image = _truncated_png(tree)
    cfg = _config(tree, tmp_path / "out", extra=("data.num_workers=1",))
    with pytest.raises(ImageReadError) as info:
        _train(cfg)
    assert str(image) in str(info.value) and "truncated" in str(info.value)


def test_images_of_different_sizes_give_features_on_one_grid(tree: Path) -> None:
    """Handled means really handled: every image becomes (3, S, S), every mask (1, S, S) in {0, 1}."""
    from moleflow.data.datamodule import ContinualDataModule

    _different_sizes(tree)
    _mixed_modes(tree)
    dm = ContinualDataModule(tree, [CAT], image_size=32)
    for dataset in (dm.train_dataset(0), dm.test_dataset(0)):
        for i in range(len(dataset)):
            item = dataset[i]
            assert item["image"].shape == (3, 32, 32) and torch.isfinite(item["image"]).all()
            assert item["mask"].shape == (1, 32, 32) and set(item["mask"].unique().tolist()) <= {0.0, 1.0}


# ------------------------------------------------------------------------ B. bad configurations
@dataclass(frozen=True)
class BadSetting:
    """An override, the pattern its ValueError must match, and whether validate_config catches it."""

    override: str
    pattern: str
    by_validate_config: bool = True


BAD_SETTINGS = {
    "ncl_negative": BadSetting("ncl=-1", r"ncl must be >= 0.*got -1"),
    "dia_blocks_negative": BadSetting("dia_blocks=-1", r"dia_blocks must be >= 0.*got -1"),
    "lora_rank_zero": BadSetting("lora_rank=0", r"lora_rank must be >= 1, got 0"),
    "tail_top_k_ratio_zero": BadSetting("tail_top_k_ratio=0", r"tail_top_k_ratio must be in \(0, 1\], got 0"),
    "tail_top_k_ratio_above_one": BadSetting("tail_top_k_ratio=1.5", r"tail_top_k_ratio must be in \(0, 1\], got 1.5"),
    "tail_weight_above_one": BadSetting("tail_weight=2", r"tail_weight must be in \[0, 1\], got 2"),
    "lambda_logdet_negative": BadSetting("lambda_logdet=-1", r"lambda_logdet must be >= 0, got -1"),
    "embed_dim_not_multiple_of_4": BadSetting("model.flow.embed_dim=30", r"embed_dim must be a positive multiple of 4"),
    "hidden_zero": BadSetting("model.flow.hidden=0", r"model\.flow\.hidden must be >= 1, got 0"),
    "train_batch_size_zero": BadSetting("data.train_batch_size=0", r"train_batch_size must be .*>= 1, got 0"),
    "image_size_zero": BadSetting("data.image_size=0", r"image_size must be .*>= 1.*got 0"),
    "feature_cache_unknown": BadSetting("training.feature_cache=ram", r"feature_cache must be one of .*'ram'"),
    "global_vote_without_positional": BadSetting(
        "model.flow.router_global_vote=true", r"router_global_vote needs model\.flow\.router=positional"
    ),
    # larger than the 4 x 4 = 16 patches of a 32 px image: check_patch_grid_settings, after the
    # backbone
    "score_top_k_above_patch_count": BadSetting(
        "score_top_k=100000", r"score_top_k=100000 must be between 1 and the patches per image \(4x4=16\)", False
    ),
    # the positional router's 7 x 7 cells on that 4 x 4 patch grid
    "router_grid_above_patch_grid": BadSetting(
        "model.flow.router=positional",
        r"model\.flow\.router_grid=7 is larger than the patch grid 4x4.*at most 4",
        False,
    ),
}
# without validate_config these passed train(cfg) silently or failed inside torch
CAUGHT_BY_VALIDATE_CONFIG = {
    "spatial_context_kernel_even": BadSetting("spatial_context_kernel=4", r"spatial_context_kernel must be 0 \(off\)"),
    "scale_context_kernel_even": BadSetting("scale_context_kernel=4", r"scale_context_kernel must be 0 \(off\)"),
    "epochs_zero": BadSetting("training.epochs=0", r"training\.epochs must be >= 1, got 0"),
    "learning_rate_zero": BadSetting("model.optimizer.lr=0", r"model\.optimizer\.lr must be > 0, got 0"),
    "floor_without_position": BadSetting(
        "model.flow.standardize_floor=0.3", r"standardize_floor=0.3 floors the per-position spread: it needs"
    ),
    "floor_noise_without_floor": BadSetting(
        "model.flow.standardize_floor_noise=true", r"standardize_floor_noise=true trains with noise .* it needs"
    ),
    "photometric_copies_negative": BadSetting(
        "training.photometric_copies=-1", r"training\.photometric_copies must be >= 0 \(0 = none\), got -1"
    ),
    "adapt_lr_scale_zero": BadSetting(
        "model.scheduler.adapt_lr_scale=0", r"model\.scheduler\.adapt_lr_scale must be > 0 \(1 = MAIN\), got 0"
    ),
}
TRAIN_ROWS = [pytest.param(s, id=k) for k, s in BAD_SETTINGS.items()] + [
    pytest.param(s, id=k) for k, s in CAUGHT_BY_VALIDATE_CONFIG.items()
]
CHECKED_ROWS = {k: s for k, s in {**BAD_SETTINGS, **CAUGHT_BY_VALIDATE_CONFIG}.items() if s.by_validate_config}


@pytest.mark.parametrize("setting", TRAIN_ROWS)
def test_bad_setting_refused_by_train(setting: BadSetting, pristine: Path, tmp_path: Path) -> None:
    cfg = _config(pristine, tmp_path / "out", extra=(setting.override,))
    with pytest.raises(ValueError, match=setting.pattern):
        _train(cfg)
    assert not (tmp_path / "out" / "checkpoints").exists()  # refused before any task was trained


@pytest.mark.parametrize("setting", list(CHECKED_ROWS.values()), ids=list(CHECKED_ROWS))
def test_validate_config_names_the_key(setting: BadSetting, pristine: Path, tmp_path: Path) -> None:
    cfg = _config(pristine, tmp_path, extra=(setting.override,))
    with pytest.raises(ValueError, match=setting.pattern) as info:
        validate_config(cfg)
    assert len(config_problems(cfg)) == 1, str(info.value)


def test_validate_config_lists_every_problem_one_per_line(pristine: Path, tmp_path: Path) -> None:
    bad = ["ncl=-1", "lora_rank=0", "spatial_context_kernel=2", "score_top_k=0", "training.epochs=0"]
    cfg = _config(pristine, tmp_path, extra=tuple(bad))
    with pytest.raises(ValueError) as info:
        validate_config(cfg)
    lines = str(info.value).splitlines()
    assert "5 invalid settings" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == [  # the schema's field order
        "ncl",
        "spatial_context_kernel",
        "lora_rank",
        "score_top_k",
        "training.epochs",
    ]


def test_validate_config_names_the_key_as_the_user_set_it(pristine: Path, tmp_path: Path) -> None:
    """``ncl=-1`` is named ``ncl``; ``model.flow.ncl=-1`` (the knob's derived copy) is refused, naming ``ncl``."""
    top = config_problems(_config(pristine, tmp_path, extra=("ncl=-1",)))
    nested = config_problems(_config(pristine, tmp_path, extra=("model.flow.ncl=-1",)))
    assert top[0].startswith("ncl must be")
    assert nested[0].startswith("model.flow.ncl is a copy of the study knob `ncl`") and "set `ncl=-1`" in nested[0]


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("tail_weight=nan", r"tail_weight must be a finite number"),
        ("model.optimizer.lr=null", r"model\.optimizer\.lr must be > 0, got None"),
        ("data.train_batch_size=2.5", r"data\.train_batch_size must be an integer >= 1, got 2.5 \(float\)"),
    ],
)
def test_validate_config_rejects_wrong_types(override: str, pattern: str, pristine: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=pattern):
        validate_config(_config(pristine, tmp_path, extra=(override,)))


@pytest.mark.parametrize(
    ("override", "key", "kind"),
    [
        ("lora_rank=4.5", "lora_rank", "Integer"),
        ("ncl=4.0", "ncl", "Integer"),
        ("ncl=true", "ncl", "Integer"),
        ("lambda_logdet=abc", "lambda_logdet", "Float"),
        ("model.flow.hidden=wide", "model.flow.hidden", "Integer"),
        ("training.steps=1.5", "training.steps", "Integer"),
    ],
)
def test_the_schema_refuses_a_wrong_type_when_composing(override: str, key: str, kind: str, tmp_path: Path) -> None:
    """Types are the schema's (moleflow.config.schema): Hydra refuses the override and names the key."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        compose_config([override], tmp_path)
    cause = str(info.value.__cause__)
    assert f"could not be converted to {kind}" in cause and f"full_key: {key}" in cause, cause


def _sweep_values(cfg: DictConfig) -> list[tuple[str, object]]:
    """Every (key, value) a multirun experiment sweeps over; config-group sweeps (+ablation) are left out."""
    pairs = []
    for key, values in (OmegaConf.select(cfg, "hydra.sweeper.params") or {}).items():
        if OmegaConf.select(cfg, key, default=None) is None:  # a group such as +ablation: checked below
            continue
        sweep = OverridesParser.create().parse_overrides([f"{key}={values}"])[0].value()
        pairs += [(key, v) for v in getattr(sweep, "list", [sweep])]
    return pairs


def test_every_shipped_configuration_passes_validate_config() -> None:
    """Wiring validate_config must not refuse anything the project ships: experiments, their sweeps, ablations."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    configs: dict[str, DictConfig] = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        configs["conf/train.yaml"] = base = compose("train")
        for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
            cfg = compose("train", overrides=[f"experiment={path.stem}"], return_hydra_config=True)
            configs[f"experiment={path.stem}"] = cfg
            for key, value in _sweep_values(cfg):
                swept = copy.deepcopy(cfg)
                OmegaConf.update(swept, key, value, merge=False)
                configs[f"experiment={path.stem} {key}={value}"] = swept
    GlobalHydra.instance().clear()
    for path in sorted((CONF_DIR / "ablation").glob("*.yaml")):  # plain @package _global_ values, no defaults
        open_base = copy.deepcopy(base)
        OmegaConf.set_struct(open_base, False)  # an ablation file may add keys (its table_rows), as +ablation does
        configs[f"+ablation={path.stem}"] = OmegaConf.merge(open_base, OmegaConf.load(path))
    assert len(configs) > 50
    for name, cfg in configs.items():
        assert config_problems(cfg) == [], name


def test_even_kernel_changes_the_grid_which_validate_config_prevents() -> None:
    """Why the kernel check exists: padding k // 2 makes an even kernel's output one patch larger."""
    from moleflow.models.mixer import SpatialContextMixer
    from moleflow.models.subnet import ScaleContext

    x = torch.zeros(1, 4, 4, 8)
    assert SpatialContextMixer(8, kernel_size=4).conv(x.permute(0, 3, 1, 2)).shape[-2:] == (5, 5)
    assert ScaleContext(8, kernel_size=4).conv(x.permute(0, 3, 1, 2)).shape[-2:] == (5, 5)
    assert SpatialContextMixer(8, kernel_size=3)(x).shape == x.shape


@pytest.fixture(scope="module")
def resnet10t() -> FeatureExtractor:
    return FeatureExtractor("resnet10t", ["layer2", "layer3"], embed_dim=32, pretrained=False)


def test_backbone_check_returns_the_real_grid(resnet10t: FeatureExtractor) -> None:
    for size in (32, 33, 64):
        assert check_backbone_accepts(resnet10t, size) == resnet10t.grid_size(size)


def test_image_smaller_than_the_largest_stride_is_refused(resnet10t: FeatureExtractor) -> None:
    """resnet10t at 8 px runs today (a 1 x 1 grid; only score_top_k > 1 stops it, naming score_top_k)."""
    with pytest.raises(ValueError) as info:
        check_backbone_accepts(resnet10t, 8)
    msg = str(info.value)
    assert "data.image_size=8" in msg and "'resnet10t'" in msg and "[8, 16]" in msg
    assert "data.image_size=32" in msg  # the suggestion: a multiple of the largest stride, at least twice it


def test_backbone_that_raises_on_the_size_is_refused() -> None:
    """timm's test_vit needs sizes divisible by its 16 px patches: its AssertionError is reported as ours."""
    vit = FeatureExtractor("test_vit", [1, 2], embed_dim=32, pretrained=False)
    with pytest.raises(ValueError, match=r"data\.image_size=40 .*'test_vit' \(strides \[16, 16\]\)") as info:
        check_backbone_accepts(vit, 40)
    assert "AssertionError" in str(info.value) and "data.image_size=48" in str(info.value)
    assert isinstance(info.value.__cause__, AssertionError)
    assert check_backbone_accepts(vit, 48) == (3, 3)


class _EmptyMapExtractor(nn.Module):
    """A backbone whose second layer comes out empty (what a too-small input does to some networks)."""

    name = "empty_maps"
    reductions = [4, 32]

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.backbone([torch.zeros(1, 8, 8, 8), torch.zeros(1, 8, 0, 0)])
        return torch.zeros(1, 8, 8, 16)


def test_empty_layer_map_is_refused() -> None:
    with pytest.raises(ValueError, match=r"data\.image_size=32 .*stride 32 gives an empty \(0, 0\) map"):
        check_backbone_accepts(_EmptyMapExtractor(), 32)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(("data.image_size=8", "score_top_k=1"), id="resnet10t_8px"),
        pytest.param(("model.backbone.name=test_vit", "model.backbone.layers=[1,2]", "data.image_size=40"), id="vit"),
    ],
)
def test_image_size_the_backbone_cannot_take_refused_by_train(extra, pristine: Path, tmp_path: Path) -> None:
    """Unchecked, resnet10t at 8 px trained on a 1 x 1 grid and test_vit at 40 px failed inside timm."""
    with pytest.raises(ValueError, match=r"data\.image_size=(8|40) does not suit backbone"):
        _train(_config(pristine, tmp_path / "out", extra=extra))


def test_unknown_backbone_is_named(pristine: Path, tmp_path: Path) -> None:
    cfg = _config(pristine, tmp_path / "out", extra=("model.backbone.name=no_such_net",))
    with pytest.raises(BackboneLoadError, match=r"'no_such_net' \(model\.backbone\.name\)"):
        _train(cfg)


# ------------------------------------------------------------------------------- C. checkpoints
def _cut(data: bytes) -> dict[str, bytes]:
    return {
        "first_half": data[: len(data) // 2],
        "first_100_bytes": data[:100],
        "second_half": data[len(data) // 2 :],  # its zip directory is intact, its start is not
        "empty": b"",
        "text": b"this is not a checkpoint\n" * 20,
        "random_bytes": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    }


@pytest.fixture(scope="module")
def real_checkpoint(tiny_run) -> Path:
    _, out, _ = tiny_run
    return out / "checkpoints" / "task_00_stripes.ckpt"


@pytest.mark.parametrize("kind", list(_cut(b"0123")))
def test_broken_checkpoint_is_named(kind: str, real_checkpoint: Path, tmp_path: Path) -> None:
    broken = tmp_path / f"{kind}.ckpt"
    broken.write_bytes(_cut(real_checkpoint.read_bytes())[kind])
    for read in (read_checkpoint_info, load_checkpoint):
        with pytest.raises(CheckpointError) as info:
            read(broken)
        assert str(broken) in str(info.value) and "truncated" in str(info.value), f"{read.__name__}: {info.value}"
        assert _raised_by_moleflow(info.value)


@pytest.mark.parametrize("content", [torch.zeros(3), {"state_dict": {}}, [1, 2], None], ids=str)
def test_torch_file_that_is_no_checkpoint_is_named(content, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.ckpt"
    torch.save(content, foreign)
    with pytest.raises(ValueError, match="is not a moleflow checkpoint") as info:
        read_checkpoint_info(foreign)
    assert str(foreign) in str(info.value)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(foreign)
    assert str(foreign) in str(info.value)


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    for read in (read_checkpoint_info, load_checkpoint):
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone.ckpt"))):
            read(tmp_path / "gone.ckpt")


def test_resume_from_a_truncated_checkpoint_is_named(real_checkpoint: Path, synthetic_root: Path, tmp_path) -> None:
    broken = tmp_path / "cut.ckpt"
    broken.write_bytes(real_checkpoint.read_bytes()[:5000])
    cfg = _compose(_resume_overrides(synthetic_root), [f"resume={broken}"], tmp_path / "out")
    with pytest.raises(CheckpointError, match=re.escape(str(broken))):
        _train(cfg)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _killed_save(obj: object, f) -> None:  # noqa: ARG001 - stands in for torch.save
    """Write the start of a file, then die the way a full disk or a kill would."""
    if hasattr(f, "write"):
        f.write(b"PK\x03\x04 partial")
    else:
        Path(f).write_bytes(b"PK\x03\x04 partial")
    raise OSError(28, "No space left on device")


def test_failed_save_keeps_the_previous_checkpoint(real_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    module = load_checkpoint(real_checkpoint)
    path = save_checkpoint(tmp_path / "task_00_stripes.ckpt", module, {"note": "first"})
    last = link_checkpoint(path, tmp_path / "last.ckpt")
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint_module.torch, "save", _killed_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, module, {"note": "second"})
    monkeypatch.undo()
    assert path.read_bytes() == before  # not replaced by the partial file
    assert _files(tmp_path) == ["last.ckpt", "task_00_stripes.ckpt"]  # no temporary file left behind
    for ckpt in (path, last):
        assert read_checkpoint_info(ckpt)["note"] == "first"
        assert load_checkpoint(ckpt).task_names == ["stripes"]


def test_failed_link_keeps_last_ckpt_valid(real_checkpoint: Path, tmp_path: Path, monkeypatch) -> None:
    module = load_checkpoint(real_checkpoint)
    first = save_checkpoint(tmp_path / "task_00.ckpt", module, {"note": "first"})
    second = save_checkpoint(tmp_path / "task_01.ckpt", module, {"note": "second"})
    last = link_checkpoint(first, tmp_path / "last.ckpt")

    def no_links(src, dst) -> None:  # noqa: ARG001 - a file system without hard links
        raise OSError(1, "Operation not permitted")

    def killed_copy(src, dst) -> None:  # noqa: ARG001 - dies half way through the copy
        Path(dst).write_bytes(b"PK\x03\x04")
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(shutil, "copyfile", killed_copy)
    with pytest.raises(KeyboardInterrupt):
        link_checkpoint(second, last)
    monkeypatch.undo()
    assert read_checkpoint_info(last)["note"] == "first"
    assert _files(tmp_path) == ["last.ckpt", "task_00.ckpt", "task_01.ckpt"]

    monkeypatch.setattr(os, "link", no_links)  # without hard links, a copy still moves last.ckpt atomically
    link_checkpoint(second, last)
    monkeypatch.undo()
    assert read_checkpoint_info(last)["note"] == "second" and load_checkpoint(last).task_names == ["stripes"]


INCOMPATIBLE = {
    "ncl": ("ncl=3", "model.flow.ncl: checkpoint 2, now 3"),
    "backbone": ("model.backbone.name=resnet14t", "model.backbone.name: checkpoint 'resnet10t', now 'resnet14t'"),
    "embed_dim": ("model.flow.embed_dim=64", "model.flow.embed_dim: checkpoint 32, now 64"),
    "image_size": ("data.image_size=32", "data.image_size: checkpoint 64, now 32"),
}


def _resume_overrides(synthetic_root: Path) -> list[str]:
    return [*TINY_OVERRIDES, f"data.root={synthetic_root}", "data.generate=null"]


@pytest.mark.parametrize(("override", "named"), list(INCOMPATIBLE.values()), ids=list(INCOMPATIBLE))
def test_check_compatible_names_the_key(override, named, real_checkpoint: Path, synthetic_root: Path, tmp_path):
    info = read_checkpoint_info(real_checkpoint)
    hparams = dict(load_checkpoint(real_checkpoint).hparams)
    same = job_settings(_compose(_resume_overrides(synthetic_root), [], tmp_path))
    check_compatible(hparams, info["run_config"], same)
    cfg = job_settings(_compose(_resume_overrides(synthetic_root), [override], tmp_path))
    with pytest.raises(ValueError, match="different configuration") as err:
        check_compatible(hparams, info["run_config"], cfg)
    assert named in str(err.value)


@pytest.mark.parametrize(("override", "named"), list(INCOMPATIBLE.values())[:3], ids=list(INCOMPATIBLE)[:3])
def test_resume_with_an_incompatible_checkpoint_is_refused(override, named, real_checkpoint, synthetic_root, tmp_path):
    cfg = _compose(_resume_overrides(synthetic_root), [override, f"resume={real_checkpoint}"], tmp_path / "out")
    with pytest.raises(ValueError) as err:
        _train(cfg)
    assert named in str(err.value)
    assert not (tmp_path / "out" / "checkpoints").exists()
