"""Study knobs have one user-facing name: the derived copies the model reads cannot be set on their own."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moleflow.config.checks import STUDY_KNOBS, config_problems, validate_config
from tests.helpers import compose_config


def test_study_knobs_are_exactly_the_model_configs_interpolations(tmp_path: Path) -> None:
    """STUDY_KNOBS lists every ``${knob}`` copy of conf/model/moleflow.yaml (and nothing else)."""
    cfg = compose_config([], tmp_path)
    raw = OmegaConf.to_container(cfg.model, resolve=False)
    found = {}

    def walk(node, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, str) and (m := re.fullmatch(r"\$\{(\w+)\}", value)) and m.group(1) in cfg:
                found[m.group(1)] = f"{prefix}{key}"

    walk(raw, "model.")
    assert found == STUDY_KNOBS


@pytest.mark.parametrize(("knob", "path"), sorted(STUDY_KNOBS.items()))
def test_setting_a_derived_copy_is_rejected_naming_the_knob(knob: str, path: str, tmp_path: Path) -> None:
    cfg = compose_config([f"{path}=1"], tmp_path)
    typed = OmegaConf.select(cfg, path)  # the schema types the value: 1 for an int field, 1.0 for a float one
    assert typed == 1
    problems = config_problems(cfg)
    assert problems[0] == (
        f"{path} is a copy of the study knob `{knob}` and cannot be set on its own (got {typed}); "
        f"set `{knob}={typed}` instead, so that the run records the value the model is built with"
    )
    with pytest.raises(ValueError, match=re.escape(f"set `{knob}={typed}` instead")):
        validate_config(cfg)


def test_the_knob_itself_and_the_defaults_pass(tmp_path: Path) -> None:
    assert config_problems(compose_config([], tmp_path)) == []
    cfg = compose_config(["ncl=8", "lora_rank=16", "score_top_k=5"], tmp_path)
    assert config_problems(cfg) == []
    assert (cfg.model.flow.ncl, cfg.model.flow.lora_rank, cfg.model.score.top_k) == (8, 16, 5)
