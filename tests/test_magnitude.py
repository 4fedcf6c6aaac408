"""Known answers for magnitude pruning and the shared mask kernel."""

from __future__ import annotations

import torch
from torch import nn

from vlmsafe_cli.compress import part_of, target_linears
from vlmsafe_cli.compress.magnitude import magnitude_prune
from vlmsafe_cli.compress.masks import kept_mask


def test_unstructured_mask_is_the_smallest_magnitudes_of_the_whole_matrix():
    weight = torch.tensor([[0.1, -5.0, 0.3, 2.0], [-0.2, 0.05, 4.0, -1.0]])
    # |W| sorted: 0.05, 0.1, 0.2, 0.3 | 1, 2, 4, 5 -> the first four are pruned, wherever they are.
    expected = torch.tensor([[False, True, False, True], [False, False, True, True]])
    assert torch.equal(kept_mask(weight.abs(), 0.5, None, per_row=False), expected)


def test_per_row_mask_compares_within_each_row():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    expected = torch.tensor([[False, False, True, True], [False, False, True, True]])
    assert torch.equal(kept_mask(scores, 0.5, None, per_row=True), expected)
    # a layer-wide threshold would prune the whole first row instead
    assert kept_mask(scores, 0.5, None, per_row=False)[0].sum() == 0


def test_n_m_mask_prunes_exactly_n_of_every_m():
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(16, 32, generator=generator)
    for zeros, group in [(2, 4), (4, 8), (1, 4)]:
        mask = kept_mask(scores, 0.0, (zeros, group), per_row=False)
        pruned_per_group = (~mask).reshape(16, -1, group).sum(-1)
        assert torch.all(pruned_per_group == zeros)
        # and the pruned ones are the smallest of their group
        grouped = scores.reshape(16, -1, group)
        largest_pruned = torch.where(~mask.reshape(16, -1, group), grouped, -1.0).amax(-1)
        smallest_kept = torch.where(mask.reshape(16, -1, group), grouped, 2.0).amin(-1)
        assert torch.all(largest_pruned < smallest_kept)


def test_magnitude_prune_hits_the_requested_sparsity_per_matrix():
    torch.manual_seed(0)
    layers = {"a": nn.Linear(64, 32), "b": nn.Linear(16, 48)}
    layers["b"].weight.data *= 100  # a global threshold would prune only from "a"
    magnitude_prune(layers, 0.3, None)
    for linear in layers.values():
        assert int((linear.weight == 0).sum()) == round(0.3 * linear.weight.numel())


def test_targets_split_a_vlm_into_parts_and_skip_patterns():
    assert part_of("model.language_model.layers.0.mlp.down_proj") == "language_model"
    assert part_of("model.vision_tower.vision_model.encoder.layers.0.mlp.fc1") == "vision_tower"
    assert part_of("model.multi_modal_projector.linear_1") == "projector"
    assert part_of("model.visual.blocks.0.attn.qkv") == "vision_tower"
    assert part_of("model.visual.merger.mlp.0") == "projector"
    model = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(4, 4)]), "lm_head": nn.Linear(4, 8)})
    assert list(target_linears(model, ["language_model"], ["lm_head"])) == ["layers.0"]
