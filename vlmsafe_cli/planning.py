"""Compose and validate every job of a run or sweep before any of them starts.

Hydra composes each job's config (keys and types checked against the schemas); `config.validate`
checks values; models and devices are checked for availability. Each problem becomes one UserError
line naming the key or option and what is valid.
"""

from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from vlmsafe_cli.config import VlmsafeConfig, validate
from vlmsafe_cli.errors import UserError

GROUPS = ("model", "compress", "analysis", "data", "judge", "experiment", "hydra/launcher")
BUILTIN_LAUNCHERS = {"basic": "in-process, one job after another (Hydra's default)"}


@dataclass
class Plan:
    jobs: list[list[str]]  # the overrides of each job
    output_dir: str  # the run dir (single job) or the sweep dir (multirun)


def _description(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#") and "@package" not in line:
            return line.lstrip("# ").strip()
    return ""


def group_options(conf: Path) -> dict[str, dict[str, str]]:
    """Each config group's options with the one-line description from the first comment of its YAML."""
    groups: dict[str, dict[str, str]] = {}
    for group in GROUPS:
        options = {p.stem: _description(p) for p in sorted((conf / group).glob("*.yaml"))}
        if group == "hydra/launcher":
            options = {**BUILTIN_LAUNCHERS, **options}
        groups[group] = options
    return groups


def _check_choices(overrides: list[Any], groups: dict[str, dict[str, str]]) -> None:
    for override in overrides:
        group = override.key_or_group.lstrip("/")
        if group not in groups or override.is_delete() or override.is_sweep_override():
            continue
        values = override.value()
        for value in values if isinstance(values, list) else [values]:
            if value is None and group == "experiment":
                continue
            if str(value) not in groups[group]:
                raise UserError(f"unknown {group} {str(value)!r}; choose one of: {', '.join(groups[group])}")


def _schema_keys(full_key: str) -> tuple[str, list[str]]:
    """The parent of a dotted key and the valid keys there, from the dataclass schemas."""
    parent, node = "", VlmsafeConfig
    for part in full_key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            break
        parent = f"{parent}.{part}" if parent else part
        default = (
            fields[part].default_factory()
            if fields[part].default_factory is not dataclasses.MISSING
            else None
        )
        node = type(default) if dataclasses.is_dataclass(default) else None
    keys = (
        [f.name for f in dataclasses.fields(node)]
        if node is not None and dataclasses.is_dataclass(node)
        else []
    )
    return parent or "the top level", keys


def _translate(err: Exception, job: list[str]) -> UserError:
    """One line for a composition error: the bad key/value and what is valid."""
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and getattr(cause, "full_key", None):
        parent, keys = _schema_keys(cause.full_key)
        valid = f"; valid keys of {parent}: {', '.join(keys)}" if keys else ""
        return UserError(f"unknown key {cause.full_key!r}{valid}")
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        message = re.sub(r"\s+", " ", str(cause).splitlines()[0])
        return UserError(f"invalid value for {cause.full_key}: {message}")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return UserError(f"{' '.join(lines[:2])} (overrides: {' '.join(job)})")


@contextmanager
def translate_errors(overrides: list[str]) -> Iterator[None]:
    """Turn Hydra/OmegaConf composition errors into one-line UserErrors."""
    try:
        yield
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise _translate(err, overrides) from None


def _compose(job: list[str]) -> DictConfig:
    with translate_errors(job):
        return compose(config_name="config", overrides=job, return_hydra_config=True)


def _expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(overrides)
    except HydraException as err:
        raise UserError(f"cannot parse overrides: {str(err).splitlines()[0]}") from None
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if not multirun:
        if sweeps:
            raise UserError(f"{sweeps[0]} sweeps over several values; add -m to run a sweep")
        return [overrides]
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    params = OmegaConf.select(_compose(fixed), "hydra.sweeper.params") or {}
    from_config = [f"{key}={value}" for key, value in params.items()]
    batches = BasicSweeper.split_arguments(parser.parse_overrides(from_config + overrides), None)
    return [job for batch in batches for job in batch]


def plan_jobs(conf: Path, overrides: list[str], multirun: bool) -> Plan:
    """Compose and validate every job; returns their overrides and where the output goes."""
    from vlmsafe_cli.models import check_available, resolve_device

    groups = group_options(conf)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3", job_name="vlmsafe"):
        jobs = _expand(overrides, multirun)
        parser = OverridesParser.create()
        checked_models: set[str] = set()
        output_dir = ""
        for job in jobs:
            _check_choices(parser.parse_overrides(job), groups)
            cfg = _compose(job)
            output_dir = str(OmegaConf.select(cfg, "hydra.sweep.dir" if multirun else "hydra.run.dir"))
            job_cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            validate(job_cfg)
            resolve_device(job_cfg.device)
            model_key = OmegaConf.to_yaml(job_cfg.model)
            if model_key not in checked_models:
                check_available(job_cfg.model)
                checked_models.add(model_key)
    return Plan(jobs=jobs, output_dir=output_dir)
