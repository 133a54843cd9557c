"""Helpers shared by tests: the tiny run's overrides, composing a config (moleflow.config.compose), damage."""

from __future__ import annotations

from pathlib import Path

from moleflow.config.compose import compose_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
__all__ = ["CONF_DIR", "TINY_OVERRIDES", "compose_config", "flip_tensor_byte"]

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
