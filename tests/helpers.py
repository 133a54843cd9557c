"""Helpers shared by tests: composing the Hydra config as the CLI would."""

from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _register() -> None:
    from moleflow.training.resolvers import register_resolvers

    register_resolvers(CONF_DIR)


_register()  # the configs' resolvers (${ablation_rows:...}, ${path_safe:...}), as the entry points do

# A tiny but complete run: generated data, random resnet10t, small flow, one epoch per task.
TINY_OVERRIDES = [
    "experiment=generated_quick",
    "logger=none",
    "trainer=cpu",
    "callbacks.model_summary=null",
    "ncl=2",
    "lora_rank=4",
    "model.flow.embed_dim=32",
    "model.flow.hidden=32",
    "training.epochs=1",
]


def compose_config(overrides: list[str], output_dir: Path, data_dir: Path | None = None, config_name: str = "train"):
    """Compose conf/<config_name>.yaml as Hydra would, with the runtime config set (for ``train(cfg)``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
        cfg.paths.output_dir = str(output_dir)
        if data_dir is not None:
            cfg.paths.data_dir = str(data_dir)
    HydraConfig().set_config(cfg)
    GlobalHydra.instance().clear()
    return cfg


def flip_tensor_byte(path: Path) -> str:
    """Flip one bit in the middle of the largest tensor stored in a torch zip file; returns the zip entry name.

    The file stays a valid zip that ``torch.load`` reads without complaint (it does not check CRCs), which is
    exactly the damage a content hash must catch.
    """
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    start = entry.header_offset + 30 + name_len + extra_len  # stored uncompressed: the tensor's raw bytes
    data[start + entry.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))
    return entry.filename
