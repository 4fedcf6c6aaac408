"""Pruning masks from importance scores: the shared kernel of magnitude, Wanda and SparseGPT masks."""

from __future__ import annotations

from typing import Optional

import torch


def kept_mask(
    scores: torch.Tensor, sparsity: float, n_m: Optional[tuple[int, int]], per_row: bool
) -> torch.Tensor:
    """Boolean mask of the weights to keep: the lowest-scoring ones are pruned.

    Unstructured: exactly round(sparsity * size) weights are pruned, compared across the whole matrix
    (`per_row=False`, magnitude pruning) or within each output row (`per_row=True`, Wanda). N:M: in every
    group of M consecutive input weights of a row, the N lowest-scoring ones are pruned.
    """
    rows, cols = scores.shape
    if n_m is not None:
        zeros, group = n_m
        if cols % group:
            raise ValueError(
                f"N:M pattern {zeros}:{group} needs the input size ({cols}) to be a multiple of {group}"
            )
        grouped = scores.reshape(rows, cols // group, group)
        pruned = torch.topk(grouped, zeros, dim=-1, largest=False).indices
        mask = torch.ones_like(grouped, dtype=torch.bool).scatter_(-1, pruned, False)
        return mask.reshape(rows, cols)
    if per_row:
        n_pruned = int(round(sparsity * cols))
        mask = torch.ones_like(scores, dtype=torch.bool)
        if n_pruned:
            pruned = torch.topk(scores, n_pruned, dim=1, largest=False).indices
            mask.scatter_(1, pruned, False)
        return mask
    n_pruned = int(round(sparsity * scores.numel()))
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_pruned:
        pruned = torch.topk(scores.flatten(), n_pruned, largest=False).indices
        mask[pruned] = False
    return mask.reshape(rows, cols)
