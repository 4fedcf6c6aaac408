"""AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration"):
scale each input channel by its activation magnitude before group quantization, then clip the groups.

Per set of linears reading one input (q/k/v, gate/up; o_proj and down_proj alone): s = mean|X_j|^alpha,
normalised by sqrt(max s * min s), with alpha searched over a grid of 20 (0, 0.05, ..., 0.95) for the
smallest output error of W' = Q(W diag(s)) diag(s)^-1; then, on the scaled weight, each (row, group)
range is clipped to r * max|w| with r in 1, 0.95, ..., 0.55 for the smallest error of that group's
output, as the reference's auto_clip. Errors are exact over all calibration tokens, computed from X^T X
(||dW X^T||^2 = tr(dW X^T X dW^T)), where the reference forwards a token sample per grid point and scores
q/k/v on the attention block's output. Quantised weights are stored dequantised with the scale divided
back in (fake-quant), so nothing outside the linear changes; `bits_per_weight` counts the per-channel
scale (fp16) that a packed export keeps where no preceding operation absorbs it. Blocks are calibrated on
the previous blocks' outputs from before their quantization, as in AutoAWQ. Written by hand for the
reasons given in gptq.py.
"""

from __future__ import annotations

from functools import partial

import torch
from omegaconf import DictConfig
from torch import nn

from vlmsafe_cli.compress.layerwise import Hessian, prune_layerwise, replace_stacked, shared_input_groups
from vlmsafe_cli.compress.quantize import quantize_dequantize
from vlmsafe_cli.models import LoadedModel

N_GRID = 20  # alpha and clip-ratio grid steps, as the reference
MAX_SHRINK = 0.5  # clip ratios go down to 1 - MAX_SHRINK (exclusive), as the reference


class ActivationStats(Hessian):
    """AWQ's statistic: X^T X (for exact output errors) and each input channel's mean |X_j|."""

    def __init__(self, columns: int, device: torch.device) -> None:
        super().__init__(columns, device)
        self.abs_total = torch.zeros(columns, dtype=torch.float32, device=device)

    def add(self, rows: torch.Tensor) -> None:
        super().add(rows)
        self.abs_total += rows.float().abs().sum(0)

    def mean_abs(self) -> torch.Tensor:
        return self.abs_total / max(self.count, 1)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Squared output error of a weight change dW over the calibration inputs, up to H's normalisation:
    tr(dW H dW^T)."""
    return float(((delta @ hessian) * delta).sum())


def _group_bounds(columns: int, group_size: int) -> list[tuple[int, int]]:
    size = columns if group_size == -1 or group_size >= columns else group_size
    return [(start, min(start + size, columns)) for start in range(0, columns, size)]


def search_scales(
    weight: torch.Tensor, hessian: torch.Tensor, mean_abs: torch.Tensor, bits: int, group_size: int
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale s = mean|X|^alpha (normalised) with the smallest output error, and
    its alpha. alpha = 0 (s = 1) is plain RTN, so the search never does worse than RTN."""
    best: tuple[float, torch.Tensor, float] = (float("inf"), torch.ones_like(mean_abs), 0.0)
    for step in range(N_GRID):
        alpha = step / N_GRID
        scales = mean_abs.pow(alpha).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        candidate = quantize_dequantize(weight * scales, bits, group_size) / scales
        error = output_error(weight - candidate, hessian)
        if error < best[0]:
            best = (error, scales, alpha)
    return best[1], best[2]


def clipped_quantize(scaled: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Quantise-dequantise `scaled` (its inputs' Hessian `hessian`) with each (row, group) clipped to
    r * max|w|, r chosen per (row, group) from 1, 0.95, ... for the smallest error of the group's output."""
    rows, columns = scaled.shape
    bounds = _group_bounds(columns, group_size)
    largest = torch.stack([scaled[:, start:end].abs().amax(dim=1) for start, end in bounds], dim=1)
    widths = torch.tensor([end - start for start, end in bounds], device=scaled.device)
    best_error = torch.full((rows, len(bounds)), float("inf"), device=scaled.device)
    best_limit = largest.clone()
    for step in range(int(MAX_SHRINK * N_GRID)):
        limit = largest * (1 - step / N_GRID)
        per_column = limit.repeat_interleave(widths, dim=1)
        delta = scaled - quantize_dequantize(scaled.clamp(-per_column, per_column), bits, group_size)
        errors = torch.stack(
            [
                ((delta[:, start:end] @ hessian[start:end, start:end]) * delta[:, start:end]).sum(1)
                for start, end in bounds
            ],
            dim=1,
        )
        better = errors < best_error
        best_error = torch.where(better, errors, best_error)
        best_limit = torch.where(better, limit, best_limit)
    per_column = best_limit.repeat_interleave(widths, dim=1)
    return quantize_dequantize(scaled.clamp(-per_column, per_column), bits, group_size)


def awq_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    mean_abs: torch.Tensor,
    bits: int,
    group_size: int,
    clip: bool = True,
) -> torch.Tensor:
    """The AWQ fake-quantised weight (float32): Q(clip(W diag(s))) diag(s)^-1."""
    values, hessian, mean_abs = weight.detach().float(), hessian.float(), mean_abs.float()
    scales, _ = search_scales(values, hessian, mean_abs, bits, group_size)
    scaled = values * scales
    if not clip:
        return quantize_dequantize(scaled, bits, group_size) / scales
    scaled_hessian = hessian / scales.reshape(-1, 1) / scales.reshape(1, -1)  # the inputs X / s
    return clipped_quantize(scaled, scaled_hessian, bits, group_size) / scales


@torch.no_grad()
def awq_quantize(loaded: LoadedModel, linears: dict[str, nn.Linear], comp: DictConfig) -> None:
    """Quantise `linears` in place with AWQ, calibrated on `comp.calibration`; linears reading one input
    share one scale vector, searched on their stacked rows."""

    def quantize(block_linears: dict[str, nn.Linear], stats: dict[str, ActivationStats]) -> None:
        for group, stat in shared_input_groups(block_linears, stats):
            quantize_rows = partial(
                awq_weight,
                hessian=stat.value(),
                mean_abs=stat.mean_abs(),
                bits=comp.bits,
                group_size=comp.group_size,
            )
            replace_stacked(group, quantize_rows)

    prune_layerwise(loaded, linears, comp.calibration, ActivationStats, quantize, propagate_compressed=False)
