"""Magnitude pruning: per weight matrix, zero the weights of smallest |W| (unstructured or N:M)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlmsafe_cli.compress.masks import kept_mask
from vlmsafe_cli.progress import track


@torch.no_grad()
def magnitude_prune(linears: dict[str, nn.Linear], sparsity: float, n_m: Optional[tuple[int, int]]) -> None:
    """Prune every matrix in place, each against its own threshold (no calibration data needed)."""
    for _, linear in track(list(linears.items()), description="magnitude pruning"):
        weight = linear.weight
        mask = kept_mask(weight.abs().float(), sparsity, n_m, per_row=False)
        weight.mul_(mask.to(weight.dtype))
