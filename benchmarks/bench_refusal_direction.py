"""Refusal-direction cost: candidate extraction (every layer x post-instruction position, one batched
capture) as a ratio to one plain forward pass over the same prompts, measured in the same run; then the
whole analysis (extraction, selection, judged rates) on one model, timed.

Usage: python benchmarks/bench_refusal_direction.py [--model smollm2-aligned] [--device cpu|cuda]
       [--n-train 128] [--n-val 32] [--n-test 32] [--skip-analysis]
Prompts: the project's alignment set (data=builtin), 128 + 128 train prompts by default.
"""

from __future__ import annotations

import argparse
import time

import torch
from omegaconf import OmegaConf

from vlmsafe_cli.analysis.refusal_direction import (
    Prompts,
    candidate_directions,
    extract,
    plain_rows,
    quality_rows,
    refusal_token_ids,
)
from vlmsafe_cli.analysis.schemas import RefusalDirectionSettings
from vlmsafe_cli.config import DataConfig, ModelConfig
from vlmsafe_cli.data.prompts import load_prompt_sets, split
from vlmsafe_cli.models import load_model, resolve_device
from vlmsafe_cli.models.adapter import get_adapter

SOURCES = {"smollm2-aligned": "organism", "smollm2": "smollm2", "tiny-llama": "tiny"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-aligned", choices=sorted(SOURCES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-val", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=32)
    parser.add_argument("--skip-analysis", action="store_true", help="only the extraction ratio")
    args = parser.parse_args()
    device = resolve_device(args.device)
    model_cfg = OmegaConf.structured(ModelConfig(name=args.model, family="llama", source=SOURCES[args.model]))
    adapter = get_adapter(load_model(model_cfg, device, seed=0))
    settings = OmegaConf.structured(
        RefusalDirectionSettings(n_train=args.n_train, n_val=args.n_val, n_test=args.n_test)
    )
    harmful, harmless = load_prompt_sets(OmegaConf.structured(DataConfig()))
    sizes = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    splits = {}
    for kind, prompts in (("harmful", harmful), ("harmless", harmless)):
        for name, texts in split(prompts, sizes, 0, kind).items():
            splits[f"{kind}_{name}"] = Prompts(texts)
    train = [splits["harmful_train"], splits["harmless_train"]]
    threads = torch.get_num_threads()
    print(f"model={args.model} device={device} threads={threads} train={args.n_train}+{args.n_train}")

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def forward_pass(module: torch.nn.Module) -> float:
        start = time.perf_counter()
        for prompts in train:
            for batch in prompts.batches(adapter, settings.batch_size):
                module(**batch, use_cache=False)
        synchronize()
        return time.perf_counter() - start

    with torch.inference_mode():
        forward_seconds = forward_pass(adapter.model)
        decoder_seconds = forward_pass(adapter.language_model())  # without the vocabulary projection
        positions = adapter.post_instruction_positions()
        start = time.perf_counter()
        diffs = candidate_directions(adapter, train[0], train[1], positions, settings.batch_size)
        synchronize()
        extract_seconds = time.perf_counter() - start
    print(
        f"plain forward pass: {forward_seconds:.2f}s; extracting {diffs.shape[0]} x {diffs.shape[1]} "
        f"candidates: {extract_seconds:.2f}s = {extract_seconds / forward_seconds:.2f}x (target <= 1.3x); "
        f"decoder-only pass {decoder_seconds:.2f}s: extraction = {extract_seconds / decoder_seconds:.2f}x it"
    )
    if args.skip_analysis:
        return
    ids = refusal_token_ids(adapter, list(settings.refusal_tokens))
    start = time.perf_counter()
    extracted = extract(adapter, splits, ids, settings)
    selected = time.perf_counter()
    rows = plain_rows("base", adapter, splits, settings)
    rows += quality_rows("base", adapter, "base", extracted.selection, splits, settings)
    finished = time.perf_counter()
    chosen = extracted.selection
    print(
        f"analysis: {finished - start:.1f}s (extraction + selection {selected - start:.1f}s, "
        f"{chosen.evaluated} candidates checked; judged rates {finished - selected:.1f}s); "
        f"layer {chosen.layer} pos {chosen.pos}, filters passed: {chosen.passed_filters}"
    )
    for entry in rows:
        if entry["metric"].endswith("rate"):
            print(f"  {entry['metric']} {entry.get('group') or ''}: {entry['value']:.3f} (n={entry['n']})")


if __name__ == "__main__":
    main()
