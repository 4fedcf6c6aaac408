"""Wanda (Sun et al. 2024, "A Simple and Effective Pruning Approach for Large Language Models").

Score S_ij = |W_ij| * ||X_j||_2, with X_j input channel j over all calibration tokens; the lowest scores
are pruned within each output row (unstructured) or within each group of M consecutive inputs (N:M). The
weights left are not updated. Blocks are pruned in order, each calibrated on the pruned blocks before it.
"""

from __future__ import annotations

from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn

from vlmsafe_cli.compress.layerwise import ColumnSquares, prune_layerwise
from vlmsafe_cli.compress.masks import kept_mask
from vlmsafe_cli.config import parse_pattern
from vlmsafe_cli.models import LoadedModel


def wanda_mask(
    weight: torch.Tensor, column_norms: torch.Tensor, sparsity: float, n_m: Optional[tuple[int, int]]
) -> torch.Tensor:
    """Kept-weight mask from S_ij = |W_ij| * ||X_j||_2 (Sun et al. 2024, eq. 1), compared per output row."""
    scores = weight.abs().float() * column_norms.to(weight.device).reshape(1, -1)
    return kept_mask(scores, sparsity, n_m, per_row=True)


@torch.no_grad()
def wanda_prune(loaded: LoadedModel, linears: dict[str, nn.Linear], comp: DictConfig) -> None:
    """Prune `linears` in place with Wanda, calibrated on `comp.calibration`."""
    n_m = parse_pattern(comp.pattern)

    def prune(block_linears: dict[str, nn.Linear], stats: dict[str, ColumnSquares]) -> None:
        for name, linear in block_linears.items():
            mask = wanda_mask(linear.weight, stats[name].norms(), comp.sparsity, n_m)
            linear.weight.mul_(mask.to(linear.weight.dtype))

    prune_layerwise(loaded, linears, comp.calibration, ColumnSquares, prune)
