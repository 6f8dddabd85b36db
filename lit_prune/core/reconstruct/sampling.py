"""Position sampling: seeded output positions of a consumer and its receptive fields there.

Only the receptive fields at the drawn positions are gathered -- never a full ``unfold`` of the feature map.
A Linear consumer reading ``C`` channels of ``r`` columns each (after a flatten) gives one sample per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sample_positions(
    module: nn.Module, x: torch.Tensor, positions_per_image: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw output positions of ``module`` for a batch of its inputs ``x``.

    Args:
        module: the consumer (Conv2d or Linear).
        x: its input, (B, C, H, W) or (B, C * r).
        positions_per_image: distinct positions per image (all of them when the output map is smaller).
        generator: the seeded CPU generator the draw comes from.

    Returns:
        ``(image, row, col)``, three long tensors of length m on ``x``'s device; a Linear has one
        sample per image at row = col = 0.
    """
    b = x.shape[0]
    if isinstance(module, nn.Linear):
        z = torch.zeros(b, dtype=torch.long)
        return torch.arange(b, device=x.device), z.to(x.device), z.to(x.device)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if positions_per_image >= ho * wo:
        pos = torch.arange(ho * wo).expand(b, -1)
    else:  # distinct positions per image: the first L of a random permutation of the map
        pos = torch.rand(b, ho * wo, generator=generator).argsort(dim=1)[:, :positions_per_image]
    img = torch.arange(b)[:, None].expand_as(pos).flatten()
    pos = pos.flatten()
    return img.to(x.device), (pos // wo).to(x.device), (pos % wo).to(x.device)


def extract_patches(
    module: nn.Module, x: torch.Tensor, index: tuple[torch.Tensor, torch.Tensor, torch.Tensor], channels: int
) -> torch.Tensor:
    """The consumer's receptive fields at the sampled positions: (m, C, k), k = kh * kw (or r for a Linear).

    ``patches[s, j] . weight[o, j]`` (taps flattened) is input channel j's contribution to output o at
    sample s, so the sum over j is the consumer's pre-bias output there.

    Args:
        module: the consumer (Conv2d or Linear).
        x: its input, (B, C, H, W) or (B, C * r).
        index: ``(image, row, col)`` from :func:`sample_positions`.
        channels: C, the number of channels the consumer reads.
    """
    img, row, col = index
    if isinstance(module, nn.Linear):
        # (B, C * r) -> (m, C, r): after a flatten, each channel owns r consecutive columns
        return x[img].reshape(img.numel(), channels, -1)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    xp = F.pad(x, (pw, pw, ph, ph)).permute(0, 2, 3, 1)  # (B, H + 2ph, W + 2pw, C), a view of one padded copy
    taps_r = (torch.arange(kh, device=x.device) * dh).repeat_interleave(kw)  # (k,): tap a * kw + b -> row a
    taps_c = (torch.arange(kw, device=x.device) * dw).repeat(kh)  # -> col b
    rows = row[:, None] * sh + taps_r  # (m, k)
    cols = col[:, None] * sw + taps_c
    return xp[img[:, None], rows, cols].transpose(1, 2)  # (m, k, C) -> (m, C, k)
