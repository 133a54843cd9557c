"""Fixed 2-D sinusoidal positional code (docs/method.md 2).

The first half of the channels encodes the column, the second half the row; each half is made of
sin/cos pairs (channel 2i = sin, 2i + 1 = cos) at frequencies exp(-2i ln(10^4) / (D / 2)).
"""

from __future__ import annotations

import math

import torch


def sinusoidal_1d(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """positions (L,) -> (L, channels) interleaved sin/cos code; channels must be even."""
    i = torch.arange(channels // 2, dtype=torch.float64)
    freq = torch.exp(-2.0 * i * math.log(1e4) / channels)  # (channels/2,)
    angles = positions.to(torch.float64)[:, None] * freq[None, :]  # (L, channels/2)
    code = torch.stack([torch.sin(angles), torch.cos(angles)], dim=-1)  # (L, channels/2, 2)
    return code.reshape(positions.shape[0], channels)


def positional_encoding_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """(H, W, D) float32 code: channels [:D/2] from the column index, [D/2:] from the row index."""
    if dim % 4:
        msg = f"The 2-D positional code needs an embedding size divisible by 4, got {dim}."
        raise ValueError(msg)
    half = dim // 2
    cols = sinusoidal_1d(torch.arange(width), half)  # (W, D/2)
    rows = sinusoidal_1d(torch.arange(height), half)  # (H, D/2)
    code = torch.cat(
        [cols[None, :, :].expand(height, width, half), rows[:, None, :].expand(height, width, half)], dim=-1
    )
    return code.to(torch.float32)
