"""SparseGPT (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot"): per linear, prune column by column and update the remaining weights to cancel the error.

From the Hessian H = 2 X^T X / n (dampened by 1% of its mean diagonal) the upper Cholesky factor of H^-1
gives each column's OBS update; masks are chosen adaptively per block of 128 columns from
w^2 / [H^-1]_jj^2 (unstructured: the lowest of each row within the block; the reference thresholds the
whole block at once) or per group of M columns (N:M); updates are applied lazily per block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
from omegaconf import DictConfig
from torch import nn

from vlmsafe_cli.compress.layerwise import Hessian, prune_layerwise, replace_stacked, shared_input_groups
from vlmsafe_cli.compress.masks import kept_mask
from vlmsafe_cli.config import parse_pattern
from vlmsafe_cli.models import LoadedModel

BLOCK_SIZE = 128
DAMPENING = 0.01
SMALL_COLUMN = 8192


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float = DAMPENING) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1; damp = `dampening` x mean diag(H), as in the reference.

    The inverse comes from `cholesky_solve` against the identity: on CPU `cholesky_inverse` is ten times
    slower."""
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    lower = torch.linalg.cholesky(hessian + dampening * hessian.diagonal().mean() * identity)
    return torch.linalg.cholesky(torch.cholesky_solve(identity, lower), upper=True)


@contextmanager
def column_loop_threads(transposed: torch.Tensor) -> Iterator[None]:
    """One CPU thread for the column loop when a column is small (<= SMALL_COLUMN weights): handing such
    small operations to several threads costs more than it saves, and stalls on a shared CPU."""
    threads = torch.get_num_threads()
    if transposed.device.type != "cpu" or transposed.shape[1] > SMALL_COLUMN or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sparsegpt_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    n_m: Optional[tuple[int, int]],
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """The pruned and reconstructed weight (float32), from the layer's input Hessian (Algorithm 1).

    Dead inputs (H_jj = 0: the channel was always zero) get H_jj = 1 and their weights zeroed, as in the
    reference. Works on W^T, one row per input column, so that each column's update is contiguous.
    """
    hessian = hessian.float().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    transposed = weight.detach().float().T.contiguous()
    transposed[dead] = 0
    factor = inverse_hessian_factor(hessian)
    if n_m is not None:  # keep N:M groups inside a block
        block_size = max(n_m[1], block_size // n_m[1] * n_m[1])
    with column_loop_threads(transposed):
        for start in range(0, transposed.shape[0], block_size):
            end = min(start + block_size, transposed.shape[0])
            block = transposed[start:end]  # a view: updated in place
            block_factor = factor[start:end, start:end]
            diagonal = block_factor.diagonal()
            errors = torch.zeros_like(block)
            if n_m is None:  # adaptive mask: the lowest w^2 / [H^-1]_jj^2 of each row within the block
                pruned = ~kept_mask(block.T.square() / diagonal.square(), sparsity, None, per_row=True).T
            else:
                pruned = torch.zeros_like(block, dtype=torch.bool)
            for column in range(end - start):
                if n_m is not None and column % n_m[1] == 0:
                    group = slice(column, column + n_m[1])
                    scores = block[group].T.square() / diagonal[group].square()
                    pruned[group] = ~kept_mask(scores, 0.0, n_m, per_row=False).T
                kept = block[column].masked_fill(pruned[column], 0.0)
                errors[column] = (block[column] - kept) / diagonal[column]
                block[column + 1 :].addr_(block_factor[column, column + 1 :], errors[column], alpha=-1)
                block[column] = kept
            transposed[end:].addmm_(factor[start:end, end:].T, errors, alpha=-1)  # lazy batch update
    return transposed.T


@torch.no_grad()
def sparsegpt_prune(loaded: LoadedModel, linears: dict[str, nn.Linear], comp: DictConfig) -> None:
    """Prune `linears` in place with SparseGPT, calibrated on `comp.calibration`.

    Linears reading the same input (q/k/v, gate/up) share one Hessian, so their rows are pruned together:
    each row's mask and update depend only on its own weights and the shared H^-1.
    """
    n_m = parse_pattern(comp.pattern)

    def prune(block_linears: dict[str, nn.Linear], stats: dict[str, Hessian]) -> None:
        for group, hessian in shared_input_groups(block_linears, stats):
            prune_rows = partial(sparsegpt_weight, hessian=hessian.value(), sparsity=comp.sparsity, n_m=n_m)
            replace_stacked(group, prune_rows)

    prune_layerwise(loaded, linears, comp.calibration, Hessian, prune)
