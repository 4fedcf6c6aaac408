"""Known answers for the AIRD weight edits on constructed (W_b, W_c) pairs."""

from __future__ import annotations

import torch

from vlmsafe_cli.analysis.aird_edits import density_added, mask_preserving_write, restore_write, ridge_readout


def pair(seed: int, rows: int = 32, columns: int = 48) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A base matrix, its 50%-magnitude-pruned copy, and a unit direction in the output space."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, columns, generator=generator)
    threshold = base.abs().flatten().kthvalue(rows * columns // 2).values
    compressed = torch.where(base.abs() > threshold, base, torch.zeros_like(base))
    direction = torch.randn(rows, generator=generator)
    return base, compressed, direction / direction.norm()


def orthogonal_basis(direction: torch.Tensor) -> torch.Tensor:
    """(rows - 1, rows): an orthonormal basis of the complement of `direction`."""
    q, _ = torch.linalg.qr(torch.cat([direction.reshape(-1, 1), torch.eye(len(direction))], dim=1))
    return q[:, 1 : len(direction)].T


def test_restore_write_restores_the_write_along_r_and_keeps_the_rest():
    base, compressed, r = pair(0)
    repaired = restore_write(compressed, base, 5 * r)  # any norm: the edit uses the unit direction
    torch.testing.assert_close(r @ repaired, r @ base, rtol=1e-5, atol=1e-5)
    complement = orthogonal_basis(r)
    torch.testing.assert_close(complement @ repaired, complement @ compressed, rtol=1e-5, atol=1e-5)


def test_restore_write_alpha_scales_the_restored_gap():
    base, compressed, r = pair(1)
    repaired = restore_write(compressed, base, r, alpha=2.0)
    torch.testing.assert_close(
        r @ repaired - r @ compressed, 2 * (r @ base - r @ compressed), rtol=1e-5, atol=1e-5
    )


def test_mask_preserving_write_restores_r_on_the_kept_weights_only():
    base, compressed, r = pair(2)
    repaired = mask_preserving_write(compressed, base, r)
    assert torch.equal(repaired == 0, compressed == 0)  # sparsity pattern kept exactly
    assert density_added(compressed, repaired) == 0.0
    torch.testing.assert_close(r @ repaired, r @ base, rtol=1e-4, atol=1e-4)
    # and it is the smallest such change: a random other change with the same effect on r is larger
    change = repaired - compressed
    noise = torch.randn_like(change) * (compressed != 0)
    noise -= (
        (compressed != 0)
        * r.reshape(-1, 1)
        * ((r @ noise) / ((compressed != 0) * r.reshape(-1, 1)).square().sum(0))
    )
    assert (change + noise).norm() > change.norm()


def test_restore_write_makes_a_pruned_matrix_dense_in_general():
    base, compressed, r = pair(3)
    repaired = restore_write(compressed, base, r)
    assert density_added(compressed, repaired) > 0.4  # r r^T spreads the edit over every row


def test_ridge_readout_matches_the_base_projection_on_its_calibration_tokens():
    generator = torch.Generator().manual_seed(4)
    base, compressed, r = pair(4)
    inputs = torch.randn(200, 48, generator=generator)
    gaps = inputs @ (base - compressed).T @ r  # base-minus-compressed output along r, per token
    repaired = ridge_readout(compressed, r, inputs, gaps, ridge=1e-6)
    torch.testing.assert_close(inputs @ repaired.T @ r, inputs @ base.T @ r, rtol=1e-3, atol=1e-3)
    complement = orthogonal_basis(r)
    torch.testing.assert_close(complement @ repaired, complement @ compressed, rtol=1e-5, atol=1e-5)
    # a strong ridge shrinks the fitted readout towards no edit
    shrunk = ridge_readout(compressed, r, inputs, gaps, ridge=1e3)
    assert (shrunk - compressed).norm() < 0.05 * (repaired - compressed).norm()
