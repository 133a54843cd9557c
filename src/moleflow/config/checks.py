"""Up-front checks of a run's configuration, so a bad value fails in a second with the key to fix.

Without them a negative ``ncl`` fails only once the model is built, an even context kernel fails deep
inside torch after the backbone has run over the whole training set (padding ``k // 2`` makes an even
kernel's output one patch larger than its input), and ``training.epochs=0`` "finishes" a run that
trained nothing. :func:`validate_config` collects every problem and reports them together, naming each
key the way the user sets it (``ncl`` for the top-level knob). Study knobs have one name: setting their
derived copy (``model.flow.ncl=8`` instead of ``ncl=8``) is itself a problem that names the knob.
Checks that need the built backbone (its real patch grid) are in :mod:`moleflow.assembly.probes`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moleflow.config.flow import floor_noise_problem, floor_problem, vote_problem
from moleflow.config.schema import JobConfig
from moleflow.config.settings import Range, ranges, value_problem

_ABSENT = object()

# The study's knobs: the only user-facing name of each of these settings (``ncl=8``), and the derived copy
# the model reads (``model.flow.ncl: ${ncl}`` in conf/model/moleflow.yaml). Setting a copy directly is
# rejected (:func:`derived_copy_problems`): the run would record ``ncl: 6`` beside a model built with 8.
STUDY_KNOBS: dict[str, str] = {
    "ncl": "model.flow.ncl",
    "lora_rank": "model.flow.lora_rank",
    "dia_blocks": "model.flow.dia_blocks",
    "scale_context_kernel": "model.flow.scale_context_kernel",
    "spatial_context_kernel": "model.flow.spatial_context_kernel",
    "tail_weight": "model.loss.tail_weight",
    "tail_top_k_ratio": "model.loss.tail_top_k_ratio",
    "lambda_logdet": "model.loss.lambda_logdet",
    "score_top_k": "model.score.top_k",
}
_SIMPLE_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")


def _schema_rules(schema: type, prefix: str = "") -> list[tuple[str, Range]]:
    """(dotted path, range) of every field of the schema that declares one, nested dataclasses included."""
    rules = []
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            rules += _schema_rules(type(default), f"{prefix}{f.name}.")
    return [(f"{prefix}{r.name}", r) for r in ranges(schema)] + rules


def _target_rule(name: str, kind: type, ok: Callable[[Any], bool], allowed: str) -> Range:
    return Range(name=name, kind=kind, ok=ok, allowed=allowed, nullable=False, choices=None)


# Ranges declared on the schema's fields (moleflow.config.schema), and the few arguments of _target_
# entries (data module, optimizer) worth refusing before anything is built, in the order they are reported.
_RULES: tuple[tuple[str, Range], ...] = (
    *_schema_rules(JobConfig),
    ("model.optimizer.lr", _target_rule("lr", float, lambda v: v > 0, "> 0")),
    ("model.scheduler.adapt_lr_scale", _target_rule("adapt_lr_scale", float, lambda v: v > 0, "> 0 (1 = MAIN)")),
    ("data.train_batch_size", _target_rule("train_batch_size", int, lambda v: v >= 1, ">= 1")),
    ("data.eval_batch_size", _target_rule("eval_batch_size", int, lambda v: v >= 1, ">= 1")),
    ("data.image_size", _target_rule("image_size", int, lambda v: v >= 1, ">= 1 (e.g. 224)")),
)


def _key_name(cfg: DictConfig, path: str) -> str:
    """The name the user sets: ``ncl`` when ``model.flow.ncl`` is ``${ncl}``, else the full path."""
    parent_path, _, key = path.rpartition(".")
    parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    if isinstance(parent, DictConfig) and key in parent and OmegaConf.is_interpolation(parent, key):
        raw = OmegaConf.to_container(parent, resolve=False)[key]  # type: ignore[index]
        match = _SIMPLE_INTERPOLATION.match(str(raw))
        if match:
            return match.group(1)
    return path


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _lookup(cfg: DictConfig, path: str) -> tuple[Any, str | None]:
    """(value, problem): ``_ABSENT`` for a key the config does not have (its code default applies)."""
    try:
        return OmegaConf.select(cfg, path, default=_ABSENT, throw_on_missing=True), None
    except OmegaConfBaseException as err:
        return None, f"cannot be resolved ({type(err).__name__}: {str(err).splitlines()[0]})"


def _check_rule(cfg: DictConfig, path: str, rng: Range) -> str | None:
    value, problem = _lookup(cfg, path)
    name = _key_name(cfg, path)
    if problem is not None:
        return f"{name} {problem}"
    if value is _ABSENT:
        return None
    problem = value_problem(rng, value)
    return None if problem is None else f"{name} {problem}"


def derived_copy_problems(cfg: DictConfig) -> list[str]:
    """A study knob's derived copy set directly (``model.flow.ncl=8``): one sentence naming the knob to set.

    The copy would build the model with 8 blocks while the run records ``ncl: 6`` and the tables file it
    under 6, so each knob keeps one user-facing name. A copy the config does not have is left alone.
    """
    problems = []
    for knob, path in STUDY_KNOBS.items():
        parent_path, _, key = path.rpartition(".")
        parent = OmegaConf.select(cfg, parent_path)
        if not isinstance(parent, DictConfig) or key not in parent:
            continue
        raw = OmegaConf.to_container(parent, resolve=False)[key]  # type: ignore[index]
        if raw == f"${{{knob}}}":
            continue
        problems.append(
            f"{path} is a copy of the study knob `{knob}` and cannot be set on its own (got {_shown(raw)}); "
            f"set `{knob}={raw}` instead, so that the run records the value the model is built with"
        )
    return problems


def config_problems(cfg: DictConfig) -> list[str]:
    """Every invalid setting of ``cfg``, one sentence each naming the key; empty when all is well."""
    problems = derived_copy_problems(cfg)
    problems += [p for path, rng in _RULES if (p := _check_rule(cfg, path, rng)) is not None]
    flow = cfg.get("model", {}).get("flow", {}) or {}
    if vote := vote_problem(str(flow.get("router", "prototype")), bool(flow.get("router_global_vote", False))):
        problems.append(vote)
    floor = flow.get("standardize_floor", 0.0)
    if isinstance(floor, int | float) and (problem := floor_problem(str(flow.get("standardize", "none")), floor)):
        problems.append(problem)
    noise = flow.get("standardize_floor_noise", False)
    if isinstance(floor, int | float) and (problem := floor_noise_problem(floor, bool(noise))):
        problems.append(problem)
    if problem := photometric_problem(cfg.get("training", {}) or {}):
        problems.append(problem)
    return problems


def photometric_problem(training: Any) -> str | None:
    """Why ``training.photometric_copies`` would add copies that are the images unchanged, or None."""
    copies = training.get("photometric_copies", 0)
    brightness, noise = training.get("photometric_brightness", 0.0), training.get("photometric_noise", 0.0)
    numbers = all(isinstance(v, int | float) for v in (copies, brightness, noise))
    if numbers and copies > 0 and brightness == 0 and noise == 0:
        return (
            f"training.photometric_copies={copies} with photometric_brightness=0 and photometric_noise=0 would add "
            "copies of the unchanged images; set either above 0, or photometric_copies=0"
        )
    return None


def validate_config(cfg: DictConfig) -> None:
    """Reject impossible settings before anything is built, listing all of them in one ValueError."""
    problems = config_problems(cfg)
    if problems:
        count = f"{len(problems)} invalid setting{'s' if len(problems) > 1 else ''}"
        msg = (
            f"The configuration has {count}; fix them on the command line (e.g. `ncl=6`) or in the config files:\n  "
            + "\n  ".join(problems)
        )
        raise ValueError(msg)
