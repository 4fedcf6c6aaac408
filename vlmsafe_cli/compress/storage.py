"""What a (possibly quantised) model occupies: weight counts, bits per weight and sizes, from its modules.

bitsandbytes linears are measured from their packed data and scales; a fake-quantised matrix (dense
dequantised values, see quantize.py) is dense in memory, and `effective` sizes count it as packed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vlmsafe_cli.compress.bnb import dequantized_weight, is_bnb_linear, weight_count, weight_storage_bits
from vlmsafe_cli.compress.quantize import bits_per_weight

# (bits, group_size, extra bits per input column) of fake-quantised target weights, or None
FakeQuant = Optional[tuple[int, int, int]]


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) weight a linear computes with, dequantised for bitsandbytes modules."""
    return dequantized_weight(linear) if is_bnb_linear(linear) else linear.weight


def linear_facts(linear: nn.Module, fake_quant: FakeQuant = None) -> tuple[int, float]:
    """(weight count, storage bits) of a linear's weight; `fake_quant` counts it as packed (see FakeQuant)."""
    if is_bnb_linear(linear):
        return weight_count(linear), float(weight_storage_bits(linear))
    count = linear.weight.numel()
    if fake_quant is not None:
        bits, group_size, column_bits = fake_quant
        columns = linear.weight.shape[1]
        return count, count * bits_per_weight(bits, group_size, row_length=columns) + column_bits * columns
    return count, float(count * linear.weight.element_size() * 8)


def model_facts(model: nn.Module, fake_quantized: dict[str, nn.Module], fake_quant: FakeQuant) -> dict:
    """n_params (weights counted unpacked), size_mb (real storage: parameters, bitsandbytes scales) and
    size_mb_effective (fake-quantised matrices counted packed), in MB of 10^6 bytes."""
    n_params = 0
    size_bits = 0.0
    seen: set[int] = set()  # tied parameters (lm_head = embed_tokens) count once
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if name == "weight" and is_bnb_linear(module):
                count, bits = linear_facts(module)
            else:
                count, bits = param.numel(), float(param.numel() * param.element_size() * 8)
            n_params += count
            size_bits += bits
    saved_bits = 0.0
    if fake_quant is not None:
        for linear in fake_quantized.values():
            count, packed_bits = linear_facts(linear, fake_quant)
            saved_bits += count * linear.weight.element_size() * 8 - packed_bits
    return {
        "n_params": n_params,
        "size_mb": size_bits / 8e6,
        "size_mb_effective": (size_bits - saved_bits) / 8e6,
    }
