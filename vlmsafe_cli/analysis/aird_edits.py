"""AIRD weight edits: restore the base model's refusal direction r (unit) in a compressed model by editing
one residual-writing matrix W (out = d_model rows, so r lives in its output space).

Chhabra & Khalili (2025) do not publish AIRD's formula; these three operationalisations are vlmsafe's own:
- restore_write: W' = W_c + alpha r r^T (W_b - W_c): the write along r becomes the base's (alpha = 1), every
  write orthogonal to r stays the compressed one.
- mask_preserving_write: the same goal, solved per input column as the minimum-norm change on the weights
  the compression kept (nonzero), so the sparsity pattern survives.
- ridge_readout: W' = W_c + r u^T, u fitted in closed form (ridge) so that the edited layer's output along r
  matches the base model's on calibration activations.
"""

from __future__ import annotations

import torch

from vlmsafe_cli.interventions import unit


def restore_write(
    compressed: torch.Tensor, base: torch.Tensor, direction: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """W_c + alpha r r^T (W_b - W_c), float32."""
    r = unit(direction)
    compressed, base = compressed.float(), base.float()
    return compressed + alpha * torch.outer(r, r @ (base - compressed))


def mask_preserving_write(
    compressed: torch.Tensor, base: torch.Tensor, direction: torch.Tensor
) -> torch.Tensor:
    """Per input column j: the smallest change on the kept entries K_j of W_c[:, j] with r^T W'[:, j] =
    r^T W_b[:, j]: delta_j = (r restricted to K_j) * gap_j / ||r restricted to K_j||^2. A column with no
    kept entry where r is nonzero cannot move and is left as it is."""
    r = unit(direction)
    compressed, base = compressed.float(), base.float()
    kept_r = (compressed != 0).float() * r.reshape(-1, 1)  # (out, in): r on each column's kept rows
    reach = kept_r.square().sum(0)
    gap = r @ (base - compressed)
    scale = torch.where(
        reach > 0, gap / reach.clamp(min=torch.finfo(reach.dtype).tiny), torch.zeros_like(gap)
    )
    return compressed + kept_r * scale


def ridge_readout(
    compressed: torch.Tensor, direction: torch.Tensor, inputs: torch.Tensor, gaps: torch.Tensor, ridge: float
) -> torch.Tensor:
    """W_c + r u^T with u = argmin ||A u - g||^2 + lambda ||u||^2, A = the matrix's inputs (tokens, in),
    g = the base-minus-compressed projection on r of the layer's output at those tokens, and lambda =
    `ridge` x the mean diagonal of A^T A (scale-free)."""
    r = unit(direction)
    inputs, gaps = inputs.float(), gaps.float()
    gram = inputs.T @ inputs
    damping = ridge * gram.diagonal().mean().clamp(min=1e-12)
    u = torch.linalg.solve(gram + damping * torch.eye(gram.shape[0]), inputs.T @ gaps)
    return compressed.float() + torch.outer(r, u)


def density_added(before: torch.Tensor, after: torch.Tensor) -> float:
    """Fraction of the matrix's entries that were zero and are not any more."""
    return float(((before == 0) & (after != 0)).float().mean())
