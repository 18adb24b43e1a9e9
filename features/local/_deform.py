"""Deformable convolution (Dai et al., ICCV 2017; with a modulation mask: Zhu et al., CVPR 2019)
in plain PyTorch.

Hand-written because the official ALIKED code calls `torchvision.ops.deform_conv2d`, and
torchvision is not a retr dependency: no build of it loads against the CPU torch that retr
pins. Same arguments and offset layout as torchvision's, so a checkpoint trained with it runs
unchanged.

Each kernel tap samples the input bilinearly (zero outside the image) at its regular position
plus its learnt offset; all taps of all output pixels are sampled in one `grid_sample` call, and
the weights are applied as one batched matrix product over the sampled columns (im2col with
moving columns). No Python loop runs over pixels or taps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair


def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Deformable 2-D convolution, torchvision.ops.deform_conv2d's contract.

    input (B, Cin, H, W); weight (Cout, Cin / groups, kh, kw), `groups` read from its shape;
    offset (B, 2 * G * kh * kw, Ho, Wo) for G offset groups (each a contiguous slice of Cin
    channels): for group g and tap t = i * kw + j (row-major in the kernel), channel
    2 * (g * kh * kw + t) is the row offset dy and the next one the column offset dx, in pixels;
    mask (B, G * kh * kw, Ho, Wo) multiplies each sampled value (None: no modulation).
    Tap (i, j) of output pixel (oy, ox) reads input position
    (oy * stride - padding + i * dilation + dy, ox * stride - padding + j * dilation + dx).
    Returns (B, Cout, Ho, Wo).
    """
    b, cin, h, w = input.shape
    cout, cin_per_group, kh, kw = weight.shape
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    taps = kh * kw
    groups = cin // cin_per_group
    offset_groups = offset.shape[1] // (2 * taps)
    if offset.shape != (b, 2 * offset_groups * taps, ho, wo) or cin % offset_groups:
        raise ValueError(
            f"offset {tuple(offset.shape)} does not fit input {tuple(input.shape)} and "
            f"weight {tuple(weight.shape)}: expected (B, 2 * G * {taps}, {ho}, {wo})"
        )
    if mask is not None and mask.shape != (b, offset_groups * taps, ho, wo):
        raise ValueError(f"mask {tuple(mask.shape)}: expected {(b, offset_groups * taps, ho, wo)}")

    dev, dt = input.device, input.dtype
    # Regular sampling positions (taps, Ho, Wo), then moved by the offsets.
    tap_y = (torch.arange(kh, device=dev, dtype=dt) * dh).repeat_interleave(kw)
    tap_x = (torch.arange(kw, device=dev, dtype=dt) * dw).repeat(kh)
    rows = torch.arange(ho, device=dev, dtype=dt) * sh - ph
    cols = torch.arange(wo, device=dev, dtype=dt) * sw - pw
    off = offset.view(b, offset_groups, taps, 2, ho, wo)
    y = tap_y[:, None, None] + rows[:, None] + off[:, :, :, 0]
    x = tap_x[:, None, None] + cols[None, :] + off[:, :, :, 1]
    # grid_sample, align_corners=False: pixel p of a side of n pixels is (2p + 1) / n - 1;
    # padding "zeros" gives each bilinear corner outside the image the value 0, as torchvision.
    grid = torch.stack(((2 * x + 1) / w - 1, (2 * y + 1) / h - 1), dim=-1)
    sampled = F.grid_sample(
        input.reshape(b * offset_groups, cin // offset_groups, h, w),
        grid.view(b * offset_groups, taps * ho, wo, 2),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    ).view(b, offset_groups, cin // offset_groups, taps, ho, wo)
    if mask is not None:
        sampled = sampled * mask.view(b, offset_groups, 1, taps, ho, wo)
    # Columns (B, groups, Cin / groups * taps, Ho * Wo), channel-major like weight's layout.
    columns = sampled.reshape(b, groups, cin_per_group * taps, ho * wo)
    kernels = weight.reshape(groups, cout // groups, cin_per_group * taps)
    out = torch.matmul(kernels, columns).view(b, cout, ho, wo)
    return out if bias is None else out + bias.view(1, cout, 1, 1)
