"""Sequential, block-by-block compression with calibration data: the machinery of Wanda, SparseGPT, GPTQ
and AWQ.

As in the reference code of Sun et al. (2024) and Frantar & Alistarh (2023): capture what enters a part's
first block, then for each block in order accumulate its target linears' input statistics over all
calibration samples, prune the block, and run the pruned block again to get the next block's inputs, so
every block is calibrated on the outputs of the already-pruned blocks before it (AWQ, as AutoAWQ, instead
propagates the blocks' outputs from before their compression). Unlike the references,
samples go through in batches. Parts run in forward order (vision tower, projector, language model); a
target linear outside a part's block list (a projector, lm_head) is pruned one-shot from one capture.
Written by hand: none of vlmsafe's dependencies prunes with calibration, and the references are scripts
for text LLMs, not libraries. "Prune" below means any in-place compression of a block's linears.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional, Protocol

import torch
from omegaconf import DictConfig
from torch import nn

from vlmsafe_cli.compress import part_of
from vlmsafe_cli.compress.calibration import calibration_batches, needs_images
from vlmsafe_cli.errors import JobError
from vlmsafe_cli.models import LoadedModel
from vlmsafe_cli.models.adapter import Batch, ModelAdapter, get_adapter
from vlmsafe_cli.progress import track

log = logging.getLogger("vlmsafe.compress")
PART_ORDER = ("vision_tower", "projector", "language_model")  # the order a VLM's forward runs them


class _StopForward(Exception):
    """Raised by a hook once everything needed from a forward is recorded: the rest is skipped."""


class Statistic(Protocol):
    """An input statistic of one linear layer, accumulated over the calibration tokens (rows)."""

    def add(self, rows: torch.Tensor) -> None: ...


class ColumnSquares:
    """Wanda's statistic: per input channel j, sum over calibration tokens of X_j^2 (= ||X_j||_2^2)."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.total = torch.zeros(columns, dtype=torch.float32, device=device)

    def add(self, rows: torch.Tensor) -> None:
        self.total += rows.float().square().sum(0)

    def norms(self) -> torch.Tensor:
        return self.total.sqrt()


class Hessian:
    """SparseGPT's statistic: H = 2 X^T X / n over n calibration tokens (Frantar & Alistarh 2023), fp32."""

    def __init__(self, columns: int, device: torch.device) -> None:
        self.total = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.float()
        self.total.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def value(self) -> torch.Tensor:
        return self.total * (2 / max(self.count, 1))


def shared_input_groups(
    linears: dict[str, nn.Linear], stats: dict[str, Any]
) -> Iterator[tuple[list[nn.Linear], Any]]:
    """The linears grouped by the statistic they share (q/k/v, gate/up read one input), with it."""
    by_input: dict[int, list[str]] = {}
    for name in linears:
        by_input.setdefault(id(stats[name]), []).append(name)
    for names in by_input.values():
        yield [linears[name] for name in names], stats[names[0]]


def replace_stacked(group: list[nn.Linear], new_weight: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Stack the weights of linears reading one input (rows of one matrix), transform, and write back."""
    stacked = torch.cat([linear.weight for linear in group])
    updated = new_weight(stacked)
    for linear, rows in zip(group, updated.split([linear.out_features for linear in group]), strict=True):
        linear.weight.copy_(rows.to(linear.weight.dtype))


NewStatistic = Callable[[int, torch.device], Statistic]  # (input size, device) -> empty statistic
PruneLinears = Callable[[dict[str, nn.Linear], dict[str, Any]], None]  # prunes in place from statistics


class _Recorder:
    """Forward pre-hooks feeding each linear's input rows to its statistic (padding rows dropped).

    Linears called in a row on the same tensor (q/k/v, gate/up) share one statistic object. Once every
    linear has seen the current batch the forward is stopped: nothing after that point is needed.
    """

    def __init__(self, linears: dict[str, nn.Linear], new_statistic: NewStatistic) -> None:
        self.linears, self.new_statistic = linears, new_statistic
        self.stats: dict[str, Any] = {}
        self.seen: set[str] = set()
        self.previous: Optional[tuple[torch.Tensor, str]] = None
        self.token_mask: Optional[torch.Tensor] = None

    def _hook(self, name: str) -> Callable:
        def pre_hook(module: nn.Module, args: tuple) -> None:
            inputs = args[0]
            if self.previous is not None and self.previous[0] is inputs:
                self.stats[name] = self.stats[self.previous[1]]
            else:
                rows = inputs.reshape(-1, inputs.shape[-1])
                if self.token_mask is not None and inputs.shape[:-1] == self.token_mask.shape:
                    rows = rows[self.token_mask.reshape(-1)]
                if name not in self.stats:
                    self.stats[name] = self.new_statistic(inputs.shape[-1], inputs.device)
                self.stats[name].add(rows)
                self.previous = (inputs, name)
            self.seen.add(name)
            if len(self.seen) == len(self.linears):
                raise _StopForward

        return pre_hook

    @contextmanager
    def attached(self) -> Iterator["_Recorder"]:
        with ExitStack() as stack:
            for name, linear in self.linears.items():
                stack.callback(linear.register_forward_pre_hook(self._hook(name)).remove)
            yield self

    def run(self, forward: Callable[[], Any], token_mask: Optional[torch.Tensor]) -> None:
        """Run one batch's forward, recording until every linear has seen it."""
        self.seen, self.previous, self.token_mask = set(), None, token_mask
        try:
            forward()
        except _StopForward:
            pass
        finally:
            self.previous = None

    def completed_stats(self) -> dict[str, Any]:
        """The statistics; a linear no input reached (nn.MultiheadAttention uses its out_proj's weight
        without calling it) gets white-input ones (identity rows), so it is pruned by magnitude per row."""
        for name in sorted(set(self.linears) - set(self.stats)):
            weight = self.linears[name].weight
            log.warning("no calibration input reached %s: pruning it as if its inputs were white", name)
            self.stats[name] = self.new_statistic(weight.shape[1], weight.device)
            self.stats[name].add(torch.eye(weight.shape[1], device=weight.device))
        return self.stats


@dataclass
class _Call:
    """How the model called a block for one batch, without the hidden states (which change as blocks
    are pruned): the other positional arguments and the keyword arguments (masks, positions, ...)."""

    args: tuple
    kwargs: dict
    hidden_as_keyword: bool

    @classmethod
    def capture(cls, args: tuple, kwargs: dict) -> tuple[torch.Tensor, "_Call"]:
        if args:
            return args[0], cls(args[1:], dict(kwargs), False)
        rest = {key: value for key, value in kwargs.items() if key != "hidden_states"}
        return kwargs["hidden_states"], cls((), rest, True)

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_as_keyword:
            output = block(*self.args, hidden_states=hidden, **self.kwargs)
        else:
            output = block(hidden, *self.args, **self.kwargs)
        return output[0] if isinstance(output, tuple) else output


def _identity(*args: Any, **kwargs: Any) -> Any:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _skipped(blocks: list[nn.Module]) -> Iterator[None]:
    """Make `blocks` return their hidden states unchanged (an instance `forward`), restored on exit."""
    saved = [block.__dict__.get("forward") for block in blocks]  # accelerate may have wrapped forward
    for block in blocks:
        block.forward = _identity
    try:
        yield
    finally:
        for block, forward in zip(blocks, saved, strict=True):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def capture_block_inputs(
    model: nn.Module, blocks: list[nn.Module], batches: list[Batch]
) -> tuple[list[torch.Tensor], list[list[_Call]]]:
    """Per batch: the hidden states entering blocks[0], and how the model calls each block.

    One forward per batch with pre-hooks (with_kwargs) on every block; all blocks but the last are
    skipped (identity) and the forward stops at the last one's pre-hook, so the whole capture costs about
    the embeddings. Every block's keyword arguments are kept, as they may differ (Gemma2's sliding-window
    masks, Qwen2.5-VL's windowed vision blocks).
    """
    hidden_per_batch: list[torch.Tensor] = []
    calls_per_batch: list[list[_Call]] = []

    def pre_hook(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, call = _Call.capture(args, kwargs)
            if index == 0:
                hidden_per_batch.append(hidden)
            calls_per_batch[-1].append(call)
            if index == len(blocks) - 1:
                raise _StopForward

        return hook

    with ExitStack() as stack:
        for index, block in enumerate(blocks):
            stack.callback(block.register_forward_pre_hook(pre_hook(index), with_kwargs=True).remove)
        stack.enter_context(_skipped(blocks[:-1]))
        for batch in batches:
            calls_per_batch.append([])
            try:
                model(**batch, use_cache=False)
            except _StopForward:
                pass
    if len(hidden_per_batch) != len(batches) or any(len(c) != len(blocks) for c in calls_per_batch):
        raise JobError("the calibration forward did not reach every block of the part being pruned")
    return hidden_per_batch, calls_per_batch


def part_blocks(adapter: ModelAdapter, part: str) -> list[nn.Module]:
    """The repeated blocks of a part, in forward order: decoder layers, ViT encoder layers or Qwen2-VL's
    `visual.blocks`; none for the projector."""
    if part == "language_model":
        return list(adapter.decoder_layers())
    tower = adapter.vision_tower() if part == "vision_tower" else None
    if tower is None:
        return []
    if "blocks" in dict(tower.named_children()):
        return list(tower.get_submodule("blocks"))
    encoder = getattr(getattr(tower, "vision_model", tower), "encoder", None)
    return list(encoder.layers) if encoder is not None else []


def _members(block: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, nn.Linear]:
    """The linears of `linears` that are submodules of `block`."""
    inside = {id(module) for module in block.modules()}
    return {name: linear for name, linear in linears.items() if id(linear) in inside}


def _token_mask(batch: Batch) -> Optional[torch.Tensor]:
    """(batch, seq) bool of the real (non-padding) tokens, or None when there is no padding."""
    mask = batch.get("attention_mask")
    if mask is None or bool(mask.all()):
        return None
    return mask.bool()


def _prune_blocks(
    model: nn.Module,
    blocks: list[nn.Module],
    groups: list[dict[str, nn.Linear]],
    batches: list[Batch],
    token_masks: list[Optional[torch.Tensor]],
    new_statistic: NewStatistic,
    prune: PruneLinears,
    part: str,
    propagate_compressed: bool,
) -> None:
    """Block by block: statistics over all batches, prune, then the block's outputs (after pruning when
    `propagate_compressed`, else before) feed the next."""
    hidden, calls = capture_block_inputs(model, blocks, batches)
    last = max(index for index, group in enumerate(groups) if group)
    for index in track(range(last + 1), description=f"pruning {part} blocks"):
        block = blocks[index]
        advanced = False
        if groups[index]:
            recorder = _Recorder(groups[index], new_statistic)
            with recorder.attached():
                for batch_index, mask in enumerate(token_masks):
                    recorder.run(partial(calls[batch_index][index], block, hidden[batch_index]), mask)
            if not propagate_compressed and index < last:  # outputs from before this block is compressed
                _advance(block, hidden, calls, index)
                advanced = True
            prune(groups[index], recorder.completed_stats())
        if index < last and not advanced:  # the outputs replace the inputs: one block's activations in memory
            _advance(block, hidden, calls, index)


def _advance(block: nn.Module, hidden: list[torch.Tensor], calls: list[list[_Call]], index: int) -> None:
    """Replace each batch's hidden states by block `index`'s outputs, in place."""
    for batch_index in range(len(hidden)):
        hidden[batch_index] = calls[batch_index][index](block, hidden[batch_index])


def _prune_one_shot(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    batches: list[Batch],
    token_masks: list[Optional[torch.Tensor]],
    new_statistic: NewStatistic,
    prune: PruneLinears,
) -> None:
    """Linears outside a block list: statistics from one capture through the model, then prune them all."""
    recorder = _Recorder(linears, new_statistic)
    with recorder.attached():
        for batch, mask in zip(batches, token_masks, strict=True):
            recorder.run(partial(model, **batch, use_cache=False), mask)
    prune(linears, recorder.completed_stats())


@torch.no_grad()
def prune_layerwise(
    loaded: LoadedModel,
    linears: dict[str, nn.Linear],
    calibration: DictConfig,
    new_statistic: NewStatistic,
    prune: PruneLinears,
    propagate_compressed: bool = True,
) -> None:
    """Prune `linears` (qualified name -> module) part by part and block by block with `prune`; later
    blocks see the compressed earlier blocks' outputs unless `propagate_compressed` is False."""
    adapter = get_adapter(loaded)
    parts = {part_of(name) for name in linears}
    batches = calibration_batches(loaded, calibration, with_images=needs_images(loaded, parts))
    for part in (part for part in PART_ORDER if part in parts):
        part_linears = {name: linear for name, linear in linears.items() if part_of(name) == part}
        token_masks = [_token_mask(batch) if part == "language_model" else None for batch in batches]
        blocks = part_blocks(adapter, part)
        groups = [_members(block, part_linears) for block in blocks]
        if any(groups):
            _prune_blocks(
                loaded.model,
                blocks,
                groups,
                batches,
                token_masks,
                new_statistic,
                prune,
                part,
                propagate_compressed,
            )
        in_blocks = {name for group in groups for name in group}
        rest = {name: linear for name, linear in part_linears.items() if name not in in_blocks}
        if rest:
            _prune_one_shot(loaded.model, rest, batches, token_masks, new_statistic, prune)
