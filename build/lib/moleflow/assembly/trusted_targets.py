"""The classes a stored config may name, and how objects are built from a stored config without Hydra.

A checkpoint carries the run's config, and moleflow rebuilds the backbone and the data module from it (predict,
eval, calibration) and the optimizer and schedule from its hyper-parameters (resume). Handing such a config
to Hydra's ``instantiate`` would let whoever wrote the file pick any importable callable, nested ones too
(``{_target_: builtins.open, _args_: [FILE, "w"]}`` truncates FILE), and the type check comes after the
call. So every ``_target_`` read from a file is checked against :data:`TRUSTED_TARGETS` (moleflow's own
choices) before anything is built, a stored entry may hold no nested ``_target_`` and no Hydra keys other
than ``_target_`` / ``_partial_``, and :func:`build_stored` calls the allowed callable itself with the
entry's plain values: no recursion and no interpolation resolution.

A user whose own run used a class of their own (say an optimizer in ``conf/model/optimizer/``) allows it for
checkpoints in code, where it cannot come from the file: ``trust_target("model.optimizer", "pkg.MyOpt")``.
The configs a user composes from their own files are not checked: they are built with ``instantiate``.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

TRUSTED_TARGETS: dict[str, set[str]] = {
    "data": {"moleflow.data.datamodule.ContinualDataModule"},
    "model.backbone": {"moleflow.models.feature_extractor.FeatureExtractor"},
    "model.optimizer": {"timm.optim.AdamP", "torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD"},
    "model.scheduler": {"moleflow.training.optim.warmup_cosine"},
}
"""Per config position, the ``_target_`` values a stored config may name (tested against ``conf/``)."""

ALLOWED_SPECIAL_KEYS = frozenset({"_target_", "_partial_"})
TARGET = "_target_"


class UntrustedTargetError(ValueError):
    """A config read from a file names code that moleflow does not build from files; nothing was built."""


def trust_target(key: str, target: str) -> None:
    """Allow ``target`` at config position ``key`` in stored configs (for a class of the user's own)."""
    if key not in TRUSTED_TARGETS:
        msg = f"Unknown config position {key!r}; stored configs are built at {sorted(TRUSTED_TARGETS)}."
        raise ValueError(msg)
    TRUSTED_TARGETS[key].add(str(target))


def _nested_targets(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every ``_target_`` key anywhere below ``value``."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            where = f"{path}.{key}"
            if key == TARGET:
                yield where, item
            yield from _nested_targets(item, where)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _nested_targets(item, f"{path}[{i}]")


def check_stored_entry(entry: Any, key: str, source: str) -> None:
    """Refuse a stored config entry that would build anything but moleflow's own choice for ``key``.

    Raises:
        UntrustedTargetError: the entry's ``_target_`` is not trusted for ``key``, it holds a nested
            ``_target_`` or a Hydra key such as ``_args_``, or it is not a mapping.
    """
    if entry is None:
        return
    if not isinstance(entry, Mapping):
        msg = f"{source}: the stored {key} is a {type(entry).__name__}, not a mapping of settings; refusing the file."
        raise UntrustedTargetError(msg)
    target = entry.get(TARGET)
    if target is not None and target not in TRUSTED_TARGETS[key]:
        msg = (
            f"{source}: the stored {key}._target_ is {target!r}, which is not one of moleflow's own choices for "
            f"{key} ({sorted(TRUSTED_TARGETS[key])}). A file must not choose which code runs, so nothing was built "
            f"and the file is refused. If you made this checkpoint with a class of your own, allow it in your code "
            f"first: moleflow.assembly.trusted_targets.trust_target({key!r}, {target!r})."
        )
        raise UntrustedTargetError(msg)
    special = sorted(str(k) for k in entry if str(k).startswith("_") and str(k).endswith("_"))
    extra = [k for k in special if k not in ALLOWED_SPECIAL_KEYS]
    if extra:
        msg = f"{source}: the stored {key} holds Hydra keys {extra}, which moleflow never writes; refusing the file."
        raise UntrustedTargetError(msg)
    nested = [(p, t) for p, t in _nested_targets({k: v for k, v in entry.items() if k != TARGET}, key)]
    if nested:
        listed = ", ".join(f"{p}={t!r}" for p, t in nested)
        msg = (
            f"{source}: the stored {key} holds nested _target_ entries ({listed}); moleflow never writes them and "
            "never builds them from a file. Refusing the file."
        )
        raise UntrustedTargetError(msg)


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def check_stored_config(run_config: Mapping[str, Any] | None, source: str) -> None:
    """Check every position moleflow builds from a stored run config (data, backbone, optimizer, schedule)."""
    if run_config is None:
        return
    if not isinstance(run_config, Mapping):
        msg = f"{source}: the stored run config is a {type(run_config).__name__}, not a mapping; refusing the file."
        raise UntrustedTargetError(msg)
    for key in TRUSTED_TARGETS:
        check_stored_entry(_lookup(run_config, key), key, source)


def _import(dotted: str) -> Callable[..., Any]:
    module_name, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def build_stored(entry: Mapping[str, Any], key: str, default_target: str, source: str, **kwargs: Any) -> Any:
    """Build the object of a stored config entry: its trusted ``_target_`` called with the entry's plain values.

    ``default_target`` stands in for an entry saved before its group named a ``_target_``. ``kwargs`` are
    added by the caller (e.g. the flow's embedding size for the backbone). ``_partial_: true`` gives a
    ``functools.partial``.
    """
    check_stored_entry(entry, key, source)
    values = dict(entry)
    target = values.pop(TARGET, None) or default_target
    if target not in TRUSTED_TARGETS[key]:
        msg = f"{source}: {key} would be built as {target!r}, which is not trusted for {key}."
        raise UntrustedTargetError(msg)
    partial = bool(values.pop("_partial_", False))
    factory = _import(target)
    if partial:
        return functools.partial(factory, **values, **kwargs)
    return factory(**values, **kwargs)
