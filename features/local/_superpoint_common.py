"""Pieces shared by the SuperPoint and MagicPoint plug-ins.

Both networks read one gray channel scaled to [0, 1] and predict, for every 8x8 cell, 65 logits:
64 for the pixels of the cell and a "dustbin" for "no keypoint here". What differs is the
encoder, the NMS and the descriptor sampling, which stay in each plug-in's file.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F

CELL = 8
"""Side in pixels of the cell that one coarse output position covers."""


def to_gray(image: np.ndarray, swap_red_blue: bool = False) -> np.ndarray:
    """(H, W) uint8 gray from an (H, W, 3) uint8 RGB image (an (H, W) input is returned as is).

    OpenCV's fixed-point BT.601 weights (0.299 R + 0.587 G + 0.114 B). `swap_red_blue` puts
    0.299 on blue and 0.114 on red instead, for networks trained on images converted that way.
    """
    if image.ndim == 2:
        return np.ascontiguousarray(image, dtype=np.uint8)
    code = cv2.COLOR_BGR2GRAY if swap_red_blue else cv2.COLOR_RGB2GRAY
    return cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), code)


def gray_tensor(gray: np.ndarray, device: torch.device) -> torch.Tensor:
    """(H, W) uint8 -> (1, 1, H, W) float32 in [0, 1], bitwise equal to float32(gray / 255.)."""
    t = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.uint8)).to(device)
    return t[None, None].float().div_(255.0)


def logits_to_heatmap(semi: torch.Tensor) -> torch.Tensor:
    """(65, h, w) cell logits -> (8h, 8w) keypoint probabilities.

    Softmax over the 65 channels, then the dustbin is dropped and channel c of cell (i, j) becomes
    pixel (8i + c // 8, 8j + c % 8), which is exactly what pixel_shuffle does.
    """
    prob = torch.softmax(semi[None], dim=1)[:, :-1]
    return F.pixel_shuffle(prob, CELL)[0, 0]


def window_max(x: torch.Tensor, radius: int) -> torch.Tensor:
    """(H, W) max over the (2r+1)^2 window centred on each pixel (outside the map is ignored).

    Done as a row pass then a column pass: exactly the same values as one square max-pool,
    several times faster for a single-channel map on CPU.
    """
    k = 2 * radius + 1
    rows = F.max_pool2d(x[None, None], (1, k), stride=1, padding=(0, radius))
    return F.max_pool2d(rows, (k, 1), stride=1, padding=(radius, 0))[0, 0]


def inside_border(
    ys: torch.Tensor, xs: torch.Tensor, border: int, height: int, width: int
) -> torch.Tensor:
    """(N,) bool: the point lies at least `border` pixels inside an (height, width) map."""
    return (ys >= border) & (ys < height - border) & (xs >= border) & (xs < width - border)


def no_features(dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empty keypoints (0, 2), scores (0,), descriptors (0, dim), all float32."""
    return np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros((0, dim), np.float32)
