"""One job: load -> compress -> analyses -> write, with timings, peak memory and a failure record.

`job.json` is written with status `running` first and rewritten at the end (`done` or `failed`), after
the results tables, so a `done` record always has its results beside it.
"""

from __future__ import annotations

import json
import logging
import platform
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from vlmsafe_cli import __version__, cache
from vlmsafe_cli.analysis import entry_function, merged_settings
from vlmsafe_cli.compress import (
    bits_by_part,
    compress_model,
    n_m_valid,
    sparsity_by_part,
    target_linears,
    verify_sparsity,
)
from vlmsafe_cli.compress.export import export_checkpoint
from vlmsafe_cli.compress.perplexity import perplexity_rows
from vlmsafe_cli.compress.quantize import FAKE_QUANT_METHODS, fake_quant_layout
from vlmsafe_cli.compress.storage import model_facts
from vlmsafe_cli.config import hashed_config, parse_targets
from vlmsafe_cli.errors import JobError, UserError
from vlmsafe_cli.models import LoadedModel, load_model, model_identity, resolve_device
from vlmsafe_cli.results import atomic_write, make_table, row, write_json, write_table

if TYPE_CHECKING:
    from vlmsafe_cli.models.adapter import ModelAdapter

log = logging.getLogger("vlmsafe.job")
LIBRARIES = ("torch", "transformers", "bitsandbytes", "hydra-core", "omegaconf", "pandas", "safetensors")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "vlmsafe": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def config_hash(cfg: DictConfig) -> str:
    return cache.stable_hash(hashed_config(cfg))


class PeakMemory:
    """Samples this process' resident memory in a background thread; `peak_mb` is the maximum seen."""

    def __init__(self, interval: float = 0.05) -> None:
        self.peak_bytes = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)

    def _sample(self, interval: float) -> None:
        process = psutil.Process()
        while not self._stop.wait(interval):
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, psutil.Process().memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


@dataclass
class Workspace:
    """What an analysis gets: the config, the models (the base one loaded on demand) and where to write."""

    cfg: DictConfig
    job_dir: Path
    device: torch.device
    compressed: LoadedModel
    _base: Optional[LoadedModel] = field(default=None, repr=False)
    memo: dict = field(default_factory=dict, repr=False)  # results analyses of one job share (by key)

    @property
    def artifacts(self) -> Path:
        path = self.job_dir / "artifacts"
        path.mkdir(exist_ok=True)
        return path

    def base(self) -> LoadedModel:
        """The uncompressed model (the same object when compress=none)."""
        if self.cfg.compress.method == "none":
            return self.compressed
        if self._base is None:
            self._base = load_model(self.cfg.model, self.device, self.cfg.seed)
        return self._base

    def adapters(self) -> dict[str, ModelAdapter]:
        """{"base": adapter} plus "compressed" when the job compresses: the models an analysis compares."""
        from vlmsafe_cli.models.adapter import get_adapter

        adapters = {"base": get_adapter(self.base())}
        if self.cfg.compress.method != "none":
            adapters["compressed"] = get_adapter(self.compressed)
        return adapters

    def cached(self, kind: str, key: dict, build: Callable[[Path], None], load: Callable[[Path], Any]) -> Any:
        """A cache entry keyed by the model identity plus `key` (e.g. base-model activations)."""
        full_key = {"model": model_identity(self.cfg.model, self.cfg.seed), **key}
        return cache.get_or_build(kind, full_key, build, load)


def find_done(directories: list[Path], hash_value: str) -> Optional[Path]:
    """A job dir among `directories` whose job.json is `done` with this config hash."""
    for directory in directories:
        record_path = directory / "job.json"
        try:
            record = json.loads(record_path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("status") == "done" and record.get("config_hash") == hash_value:
            return directory
    return None


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    message = text[0] if text else ""
    return message if isinstance(err, (UserError, JobError)) else f"{type(err).__name__}: {message}"


def compression_rows(loaded: LoadedModel, cfg: DictConfig, variant: str) -> list[dict]:
    """The size, storage, sparsity and perplexity facts every job records, for the base or compressed model.

    Fake-quantised weights are dense in memory: `size_mb` counts them as stored, `size_mb_effective` and
    `bits_per_weight` as a packed export would (bitsandbytes weights are packed in memory already).
    """
    model, comp = loaded.model, cfg.compress
    fake_quantized = variant == "compressed" and comp.method in FAKE_QUANT_METHODS
    fake_quant = fake_quant_layout(comp) if fake_quantized else None
    targets = target_linears(model, parse_targets(comp.target), list(comp.skip))
    facts = model_facts(model, targets, fake_quant)
    rows = [row("compression", variant, metric, facts[metric]) for metric in facts]
    for part, (sparsity, n_weights) in sparsity_by_part(model, comp).items():
        rows.append(row("compression", variant, "sparsity_actual", sparsity, n=n_weights, group=part))
    for part, (bits, n_weights) in bits_by_part(model, comp, fake_quant).items():
        rows.append(row("compression", variant, "bits_per_weight", bits, n=n_weights, group=part))
    valid = n_m_valid(model, comp)
    if valid is not None:
        rows.append(row("compression", variant, "n_m_valid", valid[0], n=valid[1]))
    base_key = {"model": model_identity(cfg.model, cfg.seed)} if variant == "base" else None
    return rows + perplexity_rows(loaded, comp, variant, cfg.seed, cache_key=base_key)


def run_job(cfg: DictConfig, job_dir: Path, overrides: list[str], invocation: str = "") -> str:
    """Run one job into `job_dir`; returns its status (done | failed).

    Ctrl-C marks the job failed and re-raises, so a sweep stops with every finished job intact.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    stages: dict[str, float] = {}
    record: dict[str, Any] = {
        "status": "running",
        "error": None,
        "model": cfg.model.name,
        "compress": cfg.compress.name,
        "analyses": list(cfg.analysis.keys()),
        "config_hash": config_hash(cfg),
        "seed": cfg.seed,
        "device": cfg.device,
        "stages": stages,
        "peak_rss_mb": None,
        "peak_gpu_mb": None,
        "versions": library_versions(),
        "vlmsafe_version": __version__,
        "started": datetime.now().isoformat(timespec="seconds"),
        "finished": None,
        "job_dir": str(job_dir.resolve()),
        "overrides": overrides,
        "invocation": invocation,
        "compress_cache_hit": None,
    }
    write_json(job_dir / "job.json", record)

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage %s", name)
        try:
            yield
        finally:
            stages[name] = round(time.perf_counter() - start, 4)

    monitor = PeakMemory()
    try:
        with monitor:
            device = resolve_device(cfg.device)
            record["device"] = str(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with stage("load"):
                loaded = load_model(cfg.model, device, cfg.seed)
            rows = []
            if cfg.compress.method != "none":
                with stage("facts:base"):  # sizes, bits, sparsity, perplexity
                    rows += compression_rows(loaded, cfg, "base")
            with stage("compress"):
                outcome = compress_model(loaded, cfg.compress, model_identity(cfg.model, cfg.seed))
                verify_sparsity(loaded.model, cfg.compress)
            record["compress_cache_hit"] = outcome.cache_hit
            variant = "compressed" if cfg.compress.method != "none" else "base"
            with stage(f"facts:{variant}"):
                rows += compression_rows(loaded, cfg, variant)
            if cfg.compress.method != "none":
                rows.append(row("compression", "compressed", "compress_seconds", outcome.seconds))
            workspace = Workspace(cfg=cfg, job_dir=job_dir, device=device, compressed=loaded)
            if cfg.compress.save:
                with stage("save"):
                    export_checkpoint(loaded, workspace.artifacts / "compressed")
            provenance = {
                "model": cfg.model.name,
                "compress": cfg.compress.name,
                "seed": cfg.seed,
                "config_hash": record["config_hash"],
                "vlmsafe_version": __version__,
            }
            for name, settings in cfg.analysis.items():
                with stage(f"analysis:{name}"):
                    rows += entry_function(name)(workspace, merged_settings(name, settings))
                # every finished analysis is on disk at once: a later one that fails or is interrupted
                # (job.json then says failed, and a rerun redoes the job) loses no finished result
                write_table(make_table(rows, provenance), job_dir)
            with stage("write"):
                write_table(make_table(rows, provenance), job_dir)
                resolved = OmegaConf.to_yaml(cfg, resolve=True)
                atomic_write(job_dir / "config.resolved.yaml", lambda tmp: tmp.write_text(resolved))
        record["status"] = "done"
    except KeyboardInterrupt:
        record.update(status="failed", error="interrupted (Ctrl-C) before the job finished")
        raise
    except Exception as err:  # a failed job is recorded and the sweep goes on
        log.exception("job failed")
        record.update(status="failed", error=one_line(err), error_type=type(err).__name__)
    finally:
        record["peak_rss_mb"] = round(monitor.peak_mb, 1)
        if torch.cuda.is_available() and record["device"].startswith("cuda"):
            record["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        record["finished"] = datetime.now().isoformat(timespec="seconds")
        write_json(job_dir / "job.json", record)
        log.info(
            "job %s: %s%s", job_dir, record["status"], f" ({record['error']})" if record["error"] else ""
        )
    return record["status"]
