"""The config schema holds each setting's default, type and range once (moleflow.config.schema)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moleflow.config.checks import STUDY_KNOBS, config_problems
from moleflow.config.flow import MoLEFlowConfig
from moleflow.config.loss import LossConfig
from moleflow.config.schema import JobConfig
from moleflow.config.settings import ranges
from tests.helpers import compose_config


def test_yaml_files_override_nothing_of_main(tmp_path: Path) -> None:
    """conf/train.yaml with its default groups is exactly the schema's defaults for every schema-held key."""
    composed = compose_config([], tmp_path)
    schema = OmegaConf.structured(JobConfig)
    for group in ("model.flow", "model.loss", "model.score", "training", "report", "runtime"):
        got = OmegaConf.to_container(OmegaConf.select(composed, group), resolve=True)
        want = OmegaConf.to_container(OmegaConf.select(schema, group), resolve=False)
        for key, value in want.items():
            if isinstance(value, str) and value.startswith("${"):
                continue  # paths, resolved from the run's folder
            assert got[key] == value, f"{group}.{key}"
    for knob in STUDY_KNOBS:
        assert composed[knob] == schema[knob]


def test_knob_defaults_are_the_models_own() -> None:
    assert JobConfig.ncl == MoLEFlowConfig.ncl == 6 and JobConfig.lora_rank == MoLEFlowConfig.lora_rank == 64
    assert JobConfig.tail_weight == LossConfig.tail_weight == 0.7


def _bad_value(rng) -> object:
    if rng.choices is not None:
        return "no_such_option"
    return next(v for v in (-1, 0, 2, 1.5) if not rng.ok(v))


FLOW_RANGES = list(ranges(MoLEFlowConfig))


@pytest.mark.parametrize("rng", FLOW_RANGES, ids=[r.name for r in FLOW_RANGES])
def test_one_declared_range_is_checked_in_python_and_in_the_config(rng, tmp_path: Path) -> None:
    """The range on a MoLEFlowConfig field refuses a bad value both in MoLEFlowConfig.validate (Python users)
    and in the up-front config check (command line), naming the key the user sets."""
    bad = _bad_value(rng)
    with pytest.raises(ValueError, match=rf"model\.flow\.{rng.name} must be"):
        MoLEFlowConfig(**{rng.name: bad}).validate()
    knob = next((k for k, path in STUDY_KNOBS.items() if path == f"model.flow.{rng.name}"), None)
    value = f"'{bad}'" if isinstance(bad, str) else bad
    cfg = compose_config([f"{knob or 'model.flow.' + rng.name}={value}"], tmp_path)
    problems = config_problems(cfg)
    assert len(problems) == 1 and problems[0].startswith(f"{knob or 'model.flow.' + rng.name} must be"), problems
