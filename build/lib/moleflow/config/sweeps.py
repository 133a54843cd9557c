"""The values a study sweep runs, read from its experiment file (``conf/experiment/sweep_<knob>.yaml``).

Each sweep file names its values once, in Hydra's sweep syntax (``hydra.sweeper.params.lora_rank:
16,32,64,128``); the tables read them from there, so a value added to a sweep needs no second edit.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def sweep_values(conf_dir: str | Path, name: str) -> tuple[str, list[tuple[int | float, str]]]:
    """(swept key, [(value, label as written)]) of ``conf/experiment/<name>.yaml``'s one swept knob besides seed.

    Raises:
        FileNotFoundError: no such experiment file.
        ValueError: the file sweeps no knob, or more than one besides ``seed``, or a value is not a number.
    """
    path = Path(conf_dir) / "experiment" / f"{name}.yaml"
    if not path.is_file():
        msg = f"No sweep file {path}: a sweep table reads its values from conf/experiment/<name>.yaml."
        raise FileNotFoundError(msg)
    params = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("sweeper", {}).get("params") or {}
    knobs = {k: v for k, v in params.items() if k != "seed"}
    if len(knobs) != 1:
        msg = f"{path} must sweep exactly one knob besides seed under hydra.sweeper.params, got {sorted(knobs)}."
        raise ValueError(msg)
    ((key, spec),) = knobs.items()
    labels = [part.strip() for part in str(spec).split(",") if part.strip()]
    try:
        return key, [(_number(label), label) for label in labels]
    except ValueError:
        msg = f"{path}: hydra.sweeper.params.{key} must list numbers such as 16,32,64, got {spec!r}."
        raise ValueError(msg) from None
