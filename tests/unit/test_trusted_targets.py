"""The allow-list of what a stored config may build: moleflow's own choices, checked before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moleflow.assembly.trusted_targets import (
    TRUSTED_TARGETS,
    UntrustedTargetError,
    build_stored,
    check_stored_config,
    check_stored_entry,
    trust_target,
)

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = {"data": "data", "model/backbone": "model.backbone", "model/optimizer": "model.optimizer"}
GROUPS["model/scheduler"] = "model.scheduler"


@pytest.mark.parametrize("folder", sorted(GROUPS))
def test_every_target_the_configs_name_is_trusted(folder: str) -> None:
    """A group option added under conf/ must be added to the list, or its checkpoints would be refused."""
    files = sorted((CONF / folder).glob("*.yaml"))
    assert files
    for path in files:
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        assert target in TRUSTED_TARGETS[GROUPS[folder]], f"{path}: {target}"


def test_untrusted_nested_and_hydra_keys_are_refused() -> None:
    ok = {"_target_": "moleflow.models.feature_extractor.FeatureExtractor", "name": "resnet18"}
    check_stored_entry(ok, "model.backbone", "file")
    bad = [
        ({**ok, "_target_": "os.system"}, "not one of moleflow's own"),
        ({**ok, "weights": {"_target_": "builtins.open"}}, "nested _target_"),
        ({**ok, "layers": [{"x": {"_target_": "shutil.rmtree"}}]}, "nested _target_"),
        ({**ok, "_args_": ["/etc/passwd"]}, "Hydra keys"),
        ({**ok, "_recursive_": True}, "Hydra keys"),
        ("os.system", "not a mapping"),
    ]
    for entry, message in bad:
        with pytest.raises(UntrustedTargetError, match=message):
            check_stored_entry(entry, "model.backbone", "file")
    with pytest.raises(UntrustedTargetError, match="model.optimizer._target_"):
        check_stored_config({"model": {"optimizer": {"_target_": "builtins.eval"}}}, "file")


def test_build_stored_calls_the_trusted_target_with_plain_values(monkeypatch) -> None:
    monkeypatch.setitem(TRUSTED_TARGETS, "model.optimizer", set(TRUSTED_TARGETS["model.optimizer"]))
    trust_target("model.optimizer", "collections.OrderedDict")  # a user's own class, allowed in code
    built = build_stored({"_target_": "collections.OrderedDict", "a": "${oc.env:HOME}"}, "model.optimizer", "", "f")
    assert dict(built) == {"a": "${oc.env:HOME}"}  # no interpolation is resolved
    partial = build_stored(
        {"_target_": "collections.OrderedDict", "_partial_": True, "a": 1}, "model.optimizer", "", "f"
    )
    assert dict(partial(b=2)) == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="Unknown config position"):
        trust_target("callbacks", "x.Y")
