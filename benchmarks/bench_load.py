"""Warm-cache load time of the embedded models (target: smollm2-aligned under 10 s on the dev CPU).

Usage: python benchmarks/bench_load.py [--repeats 3]. Loads each model once to warm the cache, then
times `repeats` loads and prints the median and the slowest.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf

from vlmsafe_cli.config import ModelConfig
from vlmsafe_cli.models import load_model

MODELS = {"smollm2": "llama", "smollm2-aligned": "llama", "smol-llava": "llava"}
SOURCES = {"smollm2": "smollm2", "smollm2-aligned": "organism", "smol-llava": "smol-llava"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for name, family in MODELS.items():
        cfg = OmegaConf.structured(ModelConfig(name=name, family=family, source=SOURCES[name]))
        load_model(cfg, torch.device("cpu"), seed=0)  # warm the cache
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            load_model(cfg, torch.device("cpu"), seed=0)
            seconds.append(time.perf_counter() - start)
        print(f"{name}: warm load median {statistics.median(seconds):.2f}s, max {max(seconds):.2f}s")


if __name__ == "__main__":
    main()
