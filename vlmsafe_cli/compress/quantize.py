"""Round-to-nearest (RTN) weight quantization as fake-quant: dequantised values replace the weights.

Keeping dense dequantised weights means every analysis hooks a quantised model like any other; the size a
packed export would have is reported separately (`bits_per_weight`). Written by hand because it is a few
lines of tensor code: no maintained library fake-quantises arbitrary nn.Linear on CPU and GPU alike.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from vlmsafe_cli.progress import track

# Methods whose result is a dense fake-quantised weight described by compress.bits / compress.group_size.
FAKE_QUANT_METHODS = ("rtn", "gptq", "awq")
SCALE_ZERO_BITS = 32  # one fp16 scale and one fp16 zero point per group


def group_grid(groups: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the asymmetric 2^bits-level grid over [min(w, 0), max(w, 0)] of each row of `groups`
    (last dimension = one group), keepdim; an all-zero group gets scale 1, so it stays zero."""
    max_level = 2**bits - 1
    low = groups.amin(dim=-1, keepdim=True).clamp(max=0)
    high = groups.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (high - low) / max_level
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return scale, torch.round(-low / scale)


def on_grid(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantise-dequantise `values` on the grid (scale, zero): round, clamp to [0, 2^bits - 1], rescale."""
    levels = torch.clamp(torch.round(values / scale) + zero, 0, 2**bits - 1)
    return (levels - zero) * scale


def _quantize_groups(groups: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantise-dequantise each row of `groups` (float32) on its own asymmetric 2^bits-level grid."""
    return on_grid(groups, *group_grid(groups, bits), bits)


def quantize_dequantize(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """RTN fake quantization of a (out, in) weight, per group of `group_size` inputs of each row (-1 = row).

    Asymmetric min-max grid over [min(w, 0), max(w, 0)] with an integer zero point, as GPTQ's quantizer
    (Frantar et al. 2023, `Quantizer.find_params`): 0 stays exactly 0 (pruned weights stay pruned) and the
    error is at most scale / 2. A trailing partial group (in % group_size) gets its own grid.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-d weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    size = cols if group_size == -1 or group_size >= cols else group_size
    values = weight.detach().float()
    full = cols - cols % size
    pieces = [_quantize_groups(values[:, :full].reshape(rows, -1, size), bits).reshape(rows, full)]
    if full < cols:
        pieces.append(_quantize_groups(values[:, full:], bits))
    return torch.cat(pieces, dim=1).to(weight.dtype)


def bits_per_weight(bits: int, group_size: int, row_length: Optional[int] = None) -> float:
    """Storage bits per weight of a packed RTN matrix: `bits` plus an fp16 scale and fp16 zero per group.

    With `row_length` (a matrix's input size) the count is exact: ceil(row_length / group_size) groups per
    row; group_size -1 (one group per row) needs it.
    """
    if row_length is None:
        if group_size == -1:
            raise ValueError("group_size=-1 (per row) needs row_length")
        return bits + SCALE_ZERO_BITS / group_size
    groups = 1 if group_size == -1 else math.ceil(row_length / group_size)
    return bits + SCALE_ZERO_BITS * groups / row_length


# Bits per input column a packed export stores besides the groups' scales and zeros: GPTQ with act-order
# keeps each column's group index (int32 g_idx); AWQ keeps each column's activation scale (fp16) where no
# preceding operation absorbs it, which our fake-quant form does not assume.
COLUMN_BITS = {"gptq_act_order": 32, "awq": 16}


def fake_quant_layout(comp) -> tuple[int, int, int]:
    """(bits, group_size, extra bits per input column) of a fake-quant method's packed export."""
    if comp.method == "awq":
        column_bits = COLUMN_BITS["awq"]
    elif comp.method == "gptq" and comp.act_order:
        column_bits = COLUMN_BITS["gptq_act_order"]
    else:
        column_bits = 0
    return comp.bits, comp.group_size, column_bits


@torch.no_grad()
def rtn_quantize(linears: dict[str, nn.Linear], bits: int, group_size: int) -> None:
    """Fake-quantise every targeted weight matrix in place (no calibration data needed)."""
    for _, linear in track(list(linears.items()), description=f"rtn {bits}-bit"):
        linear.weight.copy_(quantize_dequantize(linear.weight, bits, group_size))
