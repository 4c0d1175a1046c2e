"""2-D sine/cosine position code (paper Eq. 6) added to patch features to make them position-aware."""

from __future__ import annotations

import numpy as np


def position_code(height: int, width: int, channels: int, temperature: float = 10000.0) -> np.ndarray:
    """Return eta with shape (channels, height, width).

    The first half of the channels encodes the row, the second half the column, each as interleaved
    sin/cos pairs over geometrically spaced frequencies (the transformer code, extended to 2-D).  Values
    lie in [-1, 1]; the code is scaled by lambda_P by the caller.  ``channels`` must be a multiple of 4.
    """
    if channels % 4 != 0:
        raise ValueError(f"position code needs a channel count divisible by 4, got {channels}")
    quarter = channels // 4
    freq = 1.0 / temperature ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows = np.arange(height, dtype=np.float64)[:, None] * freq[None, :]  # (H, q)
    cols = np.arange(width, dtype=np.float64)[:, None] * freq[None, :]  # (W, q)
    code = np.zeros((channels, height, width), dtype=np.float64)
    half = channels // 2
    code[0:half:2] = np.sin(rows).T[:, :, None]
    code[1:half:2] = np.cos(rows).T[:, :, None]
    code[half::2] = np.sin(cols).T[:, None, :]
    code[half + 1 :: 2] = np.cos(cols).T[:, None, :]
    return code.astype(np.float32)
