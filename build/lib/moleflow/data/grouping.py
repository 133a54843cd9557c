"""Task grouping: continual scenarios that put several categories into one task.

Class-incremental anomaly detection papers report MVTec AD not only as 15 one-category tasks but
also in the settings of the incremental-AD literature: "14-1" (14 categories learnt together, then
the last one), "10-5" (10, then the other 5 together), "10-1x5" (10, then 5 single ones) or "3x5"
(5 tasks of 3). A scenario only groups `data.categories`; it never reorders them, so the category
list stays the single source of task order and a scenario cannot silently drop or repeat a category.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from moleflow.data.mvtec import check_category_names
from moleflow.data.types import CategorySplit

GROUP_SEPARATOR = "+"
"""Joins the categories of a grouped task into its name, e.g. "bottle+cable"."""

_SIZES = re.compile(r"^\d+(?:\s*-\s*\d+)+$")
_TIMES = re.compile(r"^(\d+)\s*[xX]\s*(\d+)$")
_BASE_TIMES = re.compile(r"^(\d+)\s*-\s*(\d+)\s*[xX]\s*(\d+)$")

SCENARIO_FORMATS = (
    "Accepted task_groups: null (one category per task); 'A-B' (the first A categories as task 0, then "
    "tasks of B categories each: '14-1', '10-5' = 10 then 5 together, '10-1' = 10 then 5 single ones); "
    "'A-BxN' (A, then N tasks of B, e.g. '10-1x5'); 'A-B-C-...' with three or more sizes (the size of every "
    "task, e.g. '10-1-1-1-1-1'); 'KxN' (N tasks of K categories, e.g. '3x5'); or a list of lists of "
    "category names, e.g. [[bottle, cable], [capsule]]."
)


def group_name(categories: Sequence[str]) -> str:
    """Task name of a group: its categories joined with '+' (a single category keeps its name)."""
    return GROUP_SEPARATOR.join(categories)


def _scenario_error(problem: str) -> ValueError:
    msg = f"{problem}\n{SCENARIO_FORMATS}"
    return ValueError(msg)


def _sizes_from_string(text: str, names: list[str]) -> list[int]:
    """Task sizes described by a scenario string, checked against the number of categories."""
    total = len(names)
    base_times = _BASE_TIMES.match(text)
    if base_times is not None:
        first, size, count = (int(g) for g in base_times.groups())
        if min(first, size, count) < 1:
            raise _scenario_error(f"Scenario {text!r}: task sizes and the number of tasks must be >= 1.")
        if first + size * count != total:
            msg = (
                f"Scenario {text!r} makes one task of {first} then {count} tasks of {size} = "
                f"{first + size * count} categories, but data.categories has {total}: {names}. Change the "
                "scenario or the category list."
            )
            raise _scenario_error(msg)
        return [first] + [size] * count
    times = _TIMES.match(text)
    if times is not None:
        size, count = int(times.group(1)), int(times.group(2))
        if size < 1 or count < 1:
            raise _scenario_error(f"Scenario {text!r}: the task size and the number of tasks must be >= 1.")
        if size * count != total:
            msg = (
                f"Scenario {text!r} makes {count} tasks of {size} = {size * count} categories, but "
                f"data.categories has {total}: {names}. Change the scenario or the category list."
            )
            raise _scenario_error(msg)
        return [size] * count
    if _SIZES.match(text) is None:
        raise _scenario_error(f"Unknown scenario {text!r}.")
    sizes = [int(part) for part in text.split("-")]
    if min(sizes) < 1:
        raise _scenario_error(f"Scenario {text!r} has a task of size 0: every task needs at least one category.")
    if len(sizes) == 2:
        first, step = sizes
        rest = total - first
        if rest < 0 or rest % step != 0:
            msg = (
                f"Scenario {text!r} puts the first {first} categories in task 0 and then {step} per task, "
                f"but data.categories has {total} ({names}): {rest} remain, which is not a multiple of "
                f"{step}. Change the scenario or the category list."
            )
            raise _scenario_error(msg)
        return [first] + [step] * (rest // step)
    if sum(sizes) != total:
        msg = (
            f"Scenario {text!r} has task sizes summing to {sum(sizes)}, but data.categories has {total}: "
            f"{names}. The sizes must add up to the number of categories."
        )
        raise _scenario_error(msg)
    return sizes


def _explicit_groups(groups: Sequence[Sequence[str]]) -> list[list[str]]:
    """A list of lists of names as plain lists (OmegaConf ListConfig accepted), with types checked."""
    out: list[list[str]] = []
    for i, group in enumerate(groups):
        if isinstance(group, str) or not isinstance(group, Sequence):
            msg = (
                f"task_groups[{i}] is {group!r}, not a list of category names: write every task as a list, "
                f"e.g. [{group!r}] for a task with one category."
            )
            raise _scenario_error(msg)
        names = list(group)
        if not names:
            raise _scenario_error(f"task_groups[{i}] is empty: every task needs at least one category.")
        for name in names:
            if not isinstance(name, str) or not name:
                raise _scenario_error(f"task_groups[{i}] holds {name!r}: category names are non-empty strings.")
        out.append(names)
    if not out:
        raise _scenario_error("task_groups is an empty list: give at least one task, or null for one per category.")
    return out


def check_groups(groups: Sequence[Sequence[str]], categories: Sequence[str]) -> list[list[str]]:
    """Check that the groups use every category exactly once, in the order of `categories`.

    Returns:
        The groups as plain lists.

    Raises:
        ValueError: An unknown, repeated or left-out category, or groups that reorder the categories.
        TypeError: categories is not a list of names.
    """
    names = check_category_names(categories)
    out = _explicit_groups(groups)
    flat = [name for group in out for name in group]
    known = set(names)
    unknown = [name for name in flat if name not in known]
    if unknown:
        raise _scenario_error(f"Unknown category(ies) {unknown} in task_groups: the categories are {names}.")
    repeated = sorted(name for name, n in Counter(flat).items() if n > 1)
    if repeated:
        msg = f"Category(ies) {repeated} appear more than once in task_groups {out}: put each category in one task."
        raise _scenario_error(msg)
    used = set(flat)
    missing = [name for name in names if name not in used]
    if missing:
        msg = (
            f"task_groups {out} leave out {missing}: every category of data.categories must be in exactly "
            "one task (or remove it from data.categories)."
        )
        raise _scenario_error(msg)
    if flat != names:
        msg = (
            f"task_groups {out} reorder the categories: read in order they give {flat}, but data.categories "
            f"is {names}. data.categories sets the task order; reorder it (or the groups) so that both agree."
        )
        raise _scenario_error(msg)
    return out


def parse_scenario(scenario: str | Sequence[Sequence[str]] | None, categories: Sequence[str]) -> list[list[str]]:
    """Categories of every task for a scenario such as "10-5", "14-1", "3x5" or an explicit list of lists.

    Args:
        scenario: None (one category per task); "A-B" (first A categories, then tasks of B each, so
            "10-5" is two tasks and "10-1" is 10 then five single ones); "A-BxN" (A, then N tasks of B);
            "A-B-C-..." (three or more sizes: the size of every task); "KxN" (N tasks of K); or a list
            of lists of category names.
        categories: All categories, in task order (data.categories).

    Returns:
        One list of category names per task; concatenated they give `categories` exactly.

    Raises:
        ValueError: A malformed scenario, sizes that do not add up to the number of categories, or
            groups with an unknown, repeated, left-out or reordered category.
        TypeError: scenario is neither None, a string nor a list of lists.
    """
    names = check_category_names(categories)
    if scenario is None:
        return [[name] for name in names]
    if isinstance(scenario, str):
        text = scenario.strip()
        sizes = _sizes_from_string(text, names)
        groups: list[list[str]] = []
        start = 0
        for size in sizes:
            groups.append(names[start : start + size])
            start += size
        return groups
    if isinstance(scenario, Sequence):
        return check_groups(scenario, names)
    msg = f"task_groups must be None, a scenario string or a list of lists, got {type(scenario).__name__}.\n"
    raise TypeError(msg + SCENARIO_FORMATS)


def group_splits(splits: list[CategorySplit], groups: list[list[str]]) -> list[CategorySplit]:
    """Merge per-category splits into one split per task.

    A group of one category returns that category's split unchanged. A larger group is named
    "a+b+..." and holds the train and test samples of its categories concatenated in category order;
    it has masks only if all of its categories do (pixel metrics need ground truth for every image).

    Raises:
        ValueError: The groups do not use every split's category exactly once, in order.
    """
    by_name = {s.category: s for s in splits}
    checked = check_groups(groups, [s.category for s in splits])
    merged: list[CategorySplit] = []
    for group in checked:
        members = [by_name[name] for name in group]
        if len(members) == 1:
            merged.append(members[0])
            continue
        merged.append(
            CategorySplit(
                category=group_name(group),
                train=[sample for m in members for sample in m.train],
                test=[sample for m in members for sample in m.test],
                has_masks=all(m.has_masks for m in members),
            )
        )
    return merged
