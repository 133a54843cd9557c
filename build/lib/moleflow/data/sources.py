"""Data sources: one reader per layout, and runs whose tasks come from several sources.

A source turns (root, categories, options) into one :class:`CategorySplit` per category. The readers
live in their own modules; this one only knows their names, which options each accepts (its keyword
arguments) and how to chain several sources into one task sequence, so that a continual run can be
built from real data sets of different kinds (e.g. ELPV mono, ELPV poly, then Magnetic Tile, KolektorSDD,
BSData, PIPED and CrackForest, as ``conf/data/dev_benchmark.yaml`` does).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moleflow.data.bsdata import bsdata_splits
from moleflow.data.crackforest import crackforest_splits
from moleflow.data.elpv import ELPV_TASKS, elpv_splits
from moleflow.data.folder import folder_splits
from moleflow.data.kolektor import kolektor_splits
from moleflow.data.magnetic_tile import magnetic_tile_splits
from moleflow.data.mvtec import EXPECTED_LAYOUT, scan_categories
from moleflow.data.piped import piped_splits
from moleflow.data.types import CategorySplit, DatasetLayoutError
from moleflow.data.visa import visa_splits

MULTI = "multi"
MPDD_URL = "https://github.com/stepanje/MPDD"
MVTEC_BOTTLE_URL = "https://github.com/notalepower/PatchCoreViT"
MVTEC_LAYOUT_LINES = (
    "Expected layout (MVTec AD layout):\n"
    "  ROOT/CATEGORY/train/good/*.png\n"
    "  ROOT/CATEGORY/test/<defect>/*.png            (test/good holds the normal test images)\n"
    "  ROOT/CATEGORY/ground_truth/<defect>/<name>_mask.png"
)
DOWNLOAD_HINTS: dict[str, str] = {
    "mpdd": (
        f"MPDD (Metal Parts Defect Detection) comes from {MPDD_URL} : download it by hand, extract it and "
        "point `data.root` at the folder holding its category folders (bracket_black, ..., tubes)."
    ),
    "mvtec_bottle": (
        f"MVTec AD's bottle category alone is in {MVTEC_BOTTLE_URL} (folder bottle/, CC BY-NC-SA 4.0): get it with "
        "`git clone https://github.com/notalepower/PatchCoreViT data/mvtec_bottle` and point `data.root` at that "
        "clone (categories: [bottle])."
    ),
}
"""Where a data set in MVTec layout other than MVTec AD comes from, keyed by its name (data.name)."""


@dataclass(frozen=True)
class Source:
    """A reader and how it is called: ``reader(root?, categories, **options) -> list[CategorySplit]``."""

    reader: Callable[..., list[CategorySplit]]
    needs_root: bool = True
    categories_keyword: str = "categories"  # the reader's name for the task list
    positional: frozenset[str] = field(default_factory=lambda: frozenset({"root", "categories"}))

    def option_names(self) -> list[str]:
        """Options the source accepts in ``source_options`` (its reader's keyword arguments)."""
        taken = self.positional | {self.categories_keyword}
        return [name for name in inspect.signature(self.reader).parameters if name not in taken]


def _mvtec_reader(root: Path | str, categories: Sequence[str] | None) -> list[CategorySplit]:
    if categories is None:
        msg = "categories is required for source='mvtec': list the category folders in task order, e.g. ['bottle']."
        raise ValueError(msg)
    return scan_categories(root, categories)


SOURCES: dict[str, Source] = {
    "mvtec": Source(_mvtec_reader),
    "elpv": Source(elpv_splits, needs_root=False, categories_keyword="tasks", positional=frozenset({"tasks"})),
    "folder": Source(folder_splits),
    "visa": Source(visa_splits),
    "magnetic_tile": Source(magnetic_tile_splits),
    "kolektor": Source(kolektor_splits),
    "bsdata": Source(bsdata_splits),
    "piped": Source(piped_splits),
    "crackforest": Source(crackforest_splits),
}
DATA_SOURCES: tuple[str, ...] = (*SOURCES, MULTI)
"""Task sources; "multi" chains several of the others (``data.sources``)."""


def source_option_names(source: str) -> list[str]:
    """Options ``source`` accepts in ``source_options``; raises for an unknown source."""
    return _source(source).option_names()


def _source(name: str) -> Source:
    if name not in SOURCES:
        msg = f"Unknown data source {name!r}: use one of {list(DATA_SOURCES)}."
        raise ValueError(msg)
    return SOURCES[name]


def check_options(source: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Reject options the source's reader does not take, before any scanning."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        msg = f"source_options must be a mapping of option names to values, got {type(options).__name__}."
        raise TypeError(msg)
    accepted = source_option_names(source)
    unknown = sorted(str(k) for k in options if k not in accepted)
    if unknown:
        msg = f"source_options {unknown} are not accepted by source={source!r}; accepted: {accepted or 'none'}."
        raise ValueError(msg)
    return dict(options)


def _with_download_hint(err: DatasetLayoutError, hint: str) -> DatasetLayoutError:
    """The MVTec reader's error with MVTec AD's download note replaced by the data set's own."""
    text = str(err)
    if not text.endswith(EXPECTED_LAYOUT):
        return err
    problem = text[: -len(EXPECTED_LAYOUT)].rstrip("\n")
    msg = f"{problem}\n{MVTEC_LAYOUT_LINES}\n{hint}"
    return DatasetLayoutError(msg)


def read_source(
    source: str,
    root: str | Path | None,
    categories: Sequence[str] | None,
    options: Mapping[str, Any] | None = None,
    dataset_name: str | None = None,
) -> list[CategorySplit]:
    """One split per category of one source, in task order.

    ``dataset_name`` (data.name) picks the download note of an MVTec-layout data set other than MVTec AD.
    """
    spec = _source(source)
    kwargs = check_options(source, options)
    if spec.needs_root and root is None:
        msg = f"root is required for source={source!r}: give the folder holding the data set."
        raise ValueError(msg)
    args = [] if not spec.needs_root else [root]
    kwargs[spec.categories_keyword] = list(categories) if categories is not None else None
    if source == "elpv" and kwargs["tasks"] is None:
        kwargs["tasks"] = list(ELPV_TASKS)
    hint = DOWNLOAD_HINTS.get((dataset_name or "").lower())
    try:
        return spec.reader(*args, **kwargs)
    except DatasetLayoutError as err:
        if hint is None:
            raise
        raise _with_download_hint(err, hint) from None


@dataclass(frozen=True)
class SourceEntry:
    """One source of a multi-source run: what to read, and the name prefix of its categories."""

    source: str
    root: str | None = None
    categories: list[str] | None = None
    source_options: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    prefix: str = ""

    @classmethod
    def from_mapping(cls, entry: Mapping[str, Any], index: int) -> SourceEntry:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(entry) - known)
        if unknown or "source" not in entry:
            what = f"unknown keys {unknown}" if unknown else "no 'source' key"
            msg = f"data.sources[{index}] has {what}; each entry takes {sorted(known)} (source is required)."
            raise ValueError(msg)
        if entry["source"] == MULTI:
            msg = f"data.sources[{index}]: a multi-source entry cannot itself be source='multi'."
            raise ValueError(msg)
        values = dict(entry)
        values["root"] = None if values.get("root") is None else str(values["root"])
        values["categories"] = None if values.get("categories") is None else list(values["categories"])
        values["source_options"] = dict(values.get("source_options") or {})
        values["prefix"] = str(values.get("prefix") or "")
        return cls(**values)


def read_sources(entries: Sequence[Mapping[str, Any]]) -> tuple[list[CategorySplit], dict[str, dict[str, Any]]]:
    """Read several sources into one task sequence; returns the splits and, per category, where it came from.

    Categories keep their order (sources in order, then each source's own order). A ``prefix`` renames a
    source's categories (e.g. "visa_"), which is how two sources with a category of the same name coexist.
    """
    if isinstance(entries, Mapping | str) or not entries:
        msg = "data.sources must be a non-empty list, e.g. [{source: elpv}, {source: magnetic_tile, root: ...}]."
        raise ValueError(msg)
    splits: list[CategorySplit] = []
    origin: dict[str, dict[str, Any]] = {}
    for index, raw in enumerate(entries):
        entry = SourceEntry.from_mapping(raw, index)
        for split in read_source(entry.source, entry.root, entry.categories, entry.source_options, entry.name):
            name = entry.prefix + split.category
            if name in origin:
                msg = (
                    f"Category {name!r} comes from two sources ({origin[name]['source']} and {entry.source}); "
                    "give one of them a `prefix` in data.sources (e.g. prefix: visa_)."
                )
                raise ValueError(msg)
            if name != split.category:
                split = CategorySplit(category=name, train=split.train, test=split.test, has_masks=split.has_masks)
            splits.append(split)
            origin[name] = {"source": entry.source, "root": entry.root, "name": entry.name or entry.source}
    return splits, origin
