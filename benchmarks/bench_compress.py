"""Compression cost as a ratio to one forward pass over the calibration tokens, measured in the same run.

Usage: python benchmarks/bench_compress.py [--model smollm2] [--device cpu|cuda] [--n-samples 64]
       [--seq-len 256]
Prints one line per method: seconds, ratio to the forward pass, peak RSS (CPU) or peak GPU memory, and the
memory a job's model and the method take beside the target (2.5x the fp32 model + calibration activations).
The forward pass runs on seeded random token ids; the calibrated methods (Wanda, SparseGPT, GPTQ, AWQ)
calibrate on as many corpus windows of the same length, in batches of the same size (their timing does not
depend on the text). `--methods a,b` runs a subset.
"""

from __future__ import annotations

import argparse
import copy
import time

import psutil
import torch
from omegaconf import OmegaConf

from vlmsafe_cli.compress import run_method
from vlmsafe_cli.compress.calibration import BATCH_SIZE
from vlmsafe_cli.config import CalibrationConfig, CompressConfig, ModelConfig
from vlmsafe_cli.job import PeakMemory
from vlmsafe_cli.models import LoadedModel, load_model, resolve_device

METHODS = {
    "magnitude50": {"method": "magnitude", "sparsity": 0.5},
    "wanda50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt50": {"method": "sparsegpt", "sparsity": 0.5},
    "gptq4": {"method": "gptq", "bits": 4, "group_size": 128},
    "awq4": {"method": "awq", "bits": 4, "group_size": 128},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny-llama"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)  # the calibration methods' batch
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    args = parser.parse_args()
    device = resolve_device(args.device)
    source = "smollm2" if args.model == "smollm2" else "tiny"
    model_cfg = OmegaConf.structured(ModelConfig(name=args.model, family="llama", source=source))
    loaded = load_model(model_cfg, device, seed=0)
    vocab = loaded.model.config.vocab_size
    tokens = torch.randint(
        0, vocab, (args.n_samples, args.seq_len), generator=torch.Generator().manual_seed(0)
    )
    shape = f"{args.n_samples}x{args.seq_len}"
    print(f"model={args.model} device={device} tokens={shape} threads={torch.get_num_threads()}")
    model_mb = sum(p.numel() * 4 for p in loaded.model.parameters()) / 2**20
    hidden = loaded.model.config.get_text_config().hidden_size
    activations_mb = args.n_samples * args.seq_len * hidden * 4 / 2**20
    print(f"fp32 model {model_mb:.0f} MiB; calibration activations (one copy) {activations_mb:.0f} MiB")

    def forward_pass() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in tokens.split(args.batch_size):
                loaded.model.model(input_ids=batch.to(device))  # decoder only: no vocabulary projection
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    forward_seconds = forward_pass()
    print(f"forward pass (decoder): {forward_seconds:.2f}s")
    base_rss = psutil.Process().memory_info().rss / 2**20
    for name in args.methods.split(","):
        settings = METHODS[name]
        model = copy.deepcopy(loaded.model)
        copy_loaded = LoadedModel(loaded.name, loaded.family, model, loaded.processor)
        calibration = CalibrationConfig(n_samples=args.n_samples, seq_len=args.seq_len)  # the same tokens
        comp = OmegaConf.structured(CompressConfig(name=name, calibration=calibration, **settings))
        with PeakMemory() as memory:
            start = time.perf_counter()
            run_method(copy_loaded, comp)
            seconds = time.perf_counter() - start
        # what the copy and the method add = a job's one model + the method (the original stays for the next)
        job_mb = memory.peak_mb - base_rss
        print(
            f"{name}: {seconds:.2f}s = {seconds / forward_seconds:.2f}x forward; "
            f"peak RSS {memory.peak_mb:.0f} MiB (after load {base_rss:.0f}); a job's model + method: "
            f"{job_mb:.0f} MiB = {job_mb / (model_mb + activations_mb):.2f}x (model + activations), "
            f"target 2.5x model + activations = {2.5 * model_mb + activations_mb:.0f} MiB"
        )
        del model


if __name__ == "__main__":
    main()
