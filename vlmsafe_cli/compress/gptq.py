"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): per linear, quantise column by column and update the remaining weights to cancel the error.

The same Hessian machinery as SparseGPT: H = 2 X^T X / n, dampened by 1% of its mean diagonal, and the
upper Cholesky factor of H^-1 giving each column's update; blocks of 128 columns with lazy updates. Each
group of `group_size` columns gets its asymmetric min-max grid (the RTN grid of quantize.py) from its
weights as updated so far, when the loop reaches its first column. `act_order` visits the columns by
decreasing H_jj (the reference's desc_act; groups then follow that order). Weights are stored dequantised
(fake-quant), as every quantiser here.

Written by hand on the layerwise machinery, not taken from a library: llm-compressor (the maintained
GPTQ/AWQ library) pins transformers to a range (<= 5.17) older than the one vlmsafe runs on, pulls
auto-round, datasets and nvidia-ml-py, and drives its own traced pipeline over whole text models,
writing compressed-tensors checkpoints, where vlmsafe compresses any part of a VLM (vision tower,
projector) in place and keeps dense weights for its hooks; AutoGPTQ and GPTQModel need CUDA kernels.
"""

from __future__ import annotations

from functools import partial

import torch
from omegaconf import DictConfig
from torch import nn

from vlmsafe_cli.compress.layerwise import Hessian, prune_layerwise, replace_stacked, shared_input_groups
from vlmsafe_cli.compress.quantize import group_grid, on_grid
from vlmsafe_cli.compress.sparsegpt import BLOCK_SIZE, column_loop_threads, inverse_hessian_factor
from vlmsafe_cli.models import LoadedModel


def gptq_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    act_order: bool = False,
    block_size: int = BLOCK_SIZE,
) -> torch.Tensor:
    """The quantised and error-compensated weight (float32, dequantised) from the layer's input Hessian.

    `group_size` -1 means one grid per row. Dead inputs (H_jj = 0) get H_jj = 1 and their weights zeroed,
    as in the reference. Works on W^T, one row per input column, so that each column's update is contiguous.
    """
    hessian = hessian.float().clone()
    dead = hessian.diagonal() == 0
    hessian[dead, dead] = 1
    transposed = weight.detach().float().T.clone()
    transposed[dead] = 0
    columns = transposed.shape[0]
    order = torch.argsort(hessian.diagonal(), descending=True) if act_order else None
    if order is not None:
        transposed = transposed[order]
        hessian = hessian[order][:, order]
    factor = inverse_hessian_factor(hessian)
    group = columns if group_size == -1 else group_size
    scale = zero = None
    with column_loop_threads(transposed):
        for start in range(0, columns, block_size):
            end = min(start + block_size, columns)
            block = transposed[start:end]  # a view: updated in place
            block_factor = factor[start:end, start:end]
            errors = torch.zeros_like(block)
            for column in range(end - start):
                if (start + column) % group == 0:  # a new group: its grid from the weights as they are now
                    members = transposed[start + column : start + column + group]
                    scale, zero = (grid.squeeze(-1) for grid in group_grid(members.T, bits))
                quantized = on_grid(block[column], scale, zero, bits)
                errors[column] = (block[column] - quantized) / block_factor[column, column]
                block[column + 1 :].addr_(block_factor[column, column + 1 :], errors[column], alpha=-1)
                block[column] = quantized
            transposed[end:].addmm_(factor[start:end, end:].T, errors, alpha=-1)  # lazy batch update
    if order is not None:
        transposed = transposed[torch.argsort(order)]
    return transposed.T


@torch.no_grad()
def gptq_quantize(loaded: LoadedModel, linears: dict[str, nn.Linear], comp: DictConfig) -> None:
    """Quantise `linears` in place with GPTQ, calibrated on `comp.calibration`, block by block on the
    outputs of the already-quantised blocks. Linears reading one input (q/k/v, gate/up) share one Hessian
    (and with act_order one column order); their rows are quantised together, which changes nothing per row.
    """

    def quantize(block_linears: dict[str, nn.Linear], stats: dict[str, Hessian]) -> None:
        for group, hessian in shared_input_groups(block_linears, stats):
            quantize_rows = partial(
                gptq_weight,
                hessian=hessian.value(),
                bits=comp.bits,
                group_size=comp.group_size,
                act_order=comp.act_order,
            )
            replace_stacked(group, quantize_rows)

    prune_layerwise(loaded, linears, comp.calibration, Hessian, quantize)
