"""Analysis registry: each analysis is one module with one entry function (workspace, settings) -> rows.

`analysis=none` selects no analysis: the job then records only the compression facts every job
writes. The analysis issues register refusal_direction, aird, crosscoder, circuits, vlmsafe420,
safety, reliability and utility here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlmsafe_cli.errors import UserError


@dataclass(frozen=True)
class AnalysisSpec:
    """How to validate and run one analysis."""

    schema: type  # dataclass of its settings (the YAML under conf/analysis/<name>.yaml)
    entry: str  # "module:function" taking (workspace, settings) and returning a list of row dicts
    headline: tuple[str, ...] = ()  # metrics the report tabulates first


ANALYSES: dict[str, AnalysisSpec] = {}


def validate_analyses(section: Any) -> None:
    """Check each selected analysis is known and its settings fit its schema."""
    for name, settings in (section or {}).items():
        if name not in ANALYSES:
            valid = ", ".join(sorted(ANALYSES)) or "none (no analysis is implemented yet)"
            raise UserError(f"analysis {name!r} is not implemented; choose from: {valid}")
        try:
            OmegaConf.merge(OmegaConf.structured(ANALYSES[name].schema), settings)
        except OmegaConfBaseException as err:
            raise UserError(f"analysis.{name}: {str(err).splitlines()[0]}") from None


def entry_function(name: str) -> Callable[..., list[dict]]:
    module_name, function_name = ANALYSES[name].entry.split(":")
    return getattr(importlib.import_module(module_name), function_name)
