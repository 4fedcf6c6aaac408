"""`vlmsafe report PATH...`: join the results of many job dirs into summary tables, report.md and plots.

A job dir is any directory holding `job.json`; PATH may be one, a sweep dir or any tree above them.
Done jobs' rows are concatenated (newest run per config_hash); failed or unfinished jobs are listed,
never hidden. Every file is written to a temporary sibling first and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table as RichTable
from rich.text import Text

from vlmsafe_cli import __version__
from vlmsafe_cli.errors import UserError
from vlmsafe_cli.report.plots import bar_chart, layer_chart, safe_name

REQUIRED = ("model", "compress", "analysis", "variant", "metric", "value")
OPTIONAL = ("ci_low", "ci_high", "n", "layer", "group", "split")
PROVENANCE = ("seed", "config_hash", "vlmsafe_version")
NUMERIC = ("value", "ci_low", "ci_high", "n", "layer")
TEXT = ("model", "compress", "analysis", "variant", "metric", "group", "split")
VARIANT_ORDER = ("base", "compressed", "repaired", "comparison")
MAX_PLOTS_PER_ANALYSIS = 12  # each kind: bar charts of headline metrics, curves over layers
MISSING = "—"
AGGREGATED = "†"
FAILED_HEADER = ("job dir", "model", "compress", "status", "error")


@dataclass
class Job:
    """One job dir: its job.json, its rows when done, and why it is unusable if it is."""

    job_dir: Path
    meta: dict
    rows: pd.DataFrame | None = None
    problem: str | None = None

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "unknown"))

    @property
    def ok(self) -> bool:
        return self.status == "done" and self.problem is None and self.rows is not None


@dataclass
class Table:
    """A headline table as plain strings, rendered both to markdown and to rich."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportResult:
    """Where `build_report` wrote, and how many jobs went in."""

    out_dir: Path
    n_done: int
    n_failed: int
    summary_path: Path
    summary_csv_path: Path
    report_path: Path
    plot_paths: list[Path]
    superseded: list[Path] = field(default_factory=list)


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _natural_key(path: Path) -> tuple:
    """Sort key that puts job 2 before job 10."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path)))


def find_job_dirs(paths: Sequence[Path]) -> list[Path]:
    """Every directory holding job.json at or below `paths` (hidden dirs such as .hydra skipped)."""
    missing = [str(path) for path in paths if not Path(path).exists()]
    if missing:
        raise UserError(f"report: path does not exist: {', '.join(missing)}")
    not_dirs = [str(path) for path in paths if not Path(path).is_dir()]
    if not_dirs:
        raise UserError(f"report: not a directory: {', '.join(not_dirs)} (give job dirs or sweep dirs)")
    found: dict[Path, None] = {}
    for path in paths:
        for root, dirs, files in os.walk(path):
            if "job.json" in files:
                found[Path(root).resolve()] = None
                dirs[:] = []  # jobs do not nest; skip artifacts/
            else:
                dirs[:] = [name for name in dirs if not name.startswith(".")]
    if not found:
        names = ", ".join(str(path) for path in paths)
        raise UserError(f"report: no job dirs (directories containing job.json) found under {names}")
    return sorted(found, key=_natural_key)


def _read_results(job_dir: Path) -> pd.DataFrame:
    """The job's rows (parquet, else csv) with numeric and text columns normalised."""
    if (job_dir / "results.parquet").is_file():
        rows = pd.read_parquet(job_dir / "results.parquet")
    elif (job_dir / "results.csv").is_file():
        rows = pd.read_csv(job_dir / "results.csv", keep_default_na=False, na_values=[""])
    else:
        raise FileNotFoundError("status is done but there is no results.parquet or results.csv")
    absent = [name for name in REQUIRED if name not in rows.columns]
    if absent:
        raise ValueError(f"results lack required columns {absent}")
    rows = rows.copy()
    for name in NUMERIC:
        if name in rows.columns:
            rows[name] = pd.to_numeric(rows[name], errors="coerce")
    for name in TEXT:
        if name in rows.columns:
            rows[name] = rows[name].astype("string")
    return rows


def load_job(job_dir: Path) -> Job:
    """Read job.json and, for a done job, its results; a problem is recorded, never raised."""
    try:
        meta = json.loads((job_dir / "job.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return Job(job_dir, {"status": "unreadable"}, problem=f"job.json unreadable: {err}")
    job = Job(job_dir, meta)
    if job.status == "done":
        try:
            job.rows = _read_results(job_dir)
        except Exception as err:  # any unreadable table: the job is listed with the reason
            job.problem = f"{type(err).__name__}: {err}"
    return job


def _newness(job: Job) -> tuple[str, float]:
    """`finished` (ISO time, so strings sort in time order), then job.json's mtime."""
    return str(job.meta.get("finished") or ""), (job.job_dir / "job.json").stat().st_mtime


def keep_newest(jobs: Iterable[Job]) -> tuple[list[Job], list[Job]]:
    """Split done jobs into (newest per config_hash, older re-runs it supersedes); `finished` decides."""
    by_hash: dict[str, list[Job]] = {}
    for job in jobs:
        by_hash.setdefault(str(job.meta.get("config_hash") or job.job_dir), []).append(job)
    kept, superseded = [], []
    for runs in by_hash.values():
        runs.sort(key=_newness)
        kept.append(runs[-1])
        superseded.extend(runs[:-1])
    return sorted(kept, key=lambda job: _natural_key(job.job_dir)), superseded


def build_summary(jobs: Sequence[Job]) -> pd.DataFrame:
    """All rows of `jobs` with a `job_dir` column; standard columns first."""
    frames = [job.rows.assign(job_dir=str(job.job_dir)) for job in jobs if job.rows is not None]
    frames = [frame for frame in frames if not frame.empty]
    if not frames:
        columns = {name: pd.Series(dtype="float64" if name == "value" else "string") for name in REQUIRED}
        return pd.DataFrame({**columns, "job_dir": pd.Series(dtype="string")})
    summary = pd.concat(frames, ignore_index=True)
    standard = [name for name in (*REQUIRED, *OPTIONAL, *PROVENANCE, "job_dir") if name in summary.columns]
    summary = summary[standard + [name for name in summary.columns if name not in standard]]
    for name in summary.columns:
        if summary[name].dtype == object:  # mixed types across jobs: parquet needs one type
            summary[name] = summary[name].astype("string")
    return summary


def format_value(value: float) -> str:
    """3 decimals (rates line up), 3 significant digits below 0.001, thousands separators above 1000."""
    if value is None or pd.isna(value):
        return MISSING
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if value == 0 or abs(value) >= 0.001:
        return f"{value:.3f}"
    return f"{value:.3g}"


def _row_keys(frame: pd.DataFrame) -> list[str]:
    """model, compress, plus group / split when the analysis uses them (clearer than averaging them)."""
    return ["model", "compress"] + [
        name for name in ("group", "split") if name in frame and frame[name].notna().any()
    ]


def _cells(frame: pd.DataFrame, keys: list[str], by: Sequence[str] = ("metric", "variant")) -> pd.DataFrame:
    """One row per (keys, *by): mean value and row count; a CI only when one row backs the cell."""
    labels = {
        name: frame[name].astype("string").fillna(MISSING).astype(str)
        for name in (*keys, "metric", "variant")
    }
    frame = frame.assign(**labels)
    for name in ("ci_low", "ci_high"):
        if name not in frame:
            frame = frame.assign(**{name: np.nan})
    cells = frame.groupby([*keys, *by], sort=False).agg(
        value=("value", "mean"),
        ci_low=("ci_low", "first"),
        ci_high=("ci_high", "first"),
        count=("value", "size"),
    )
    cells = cells.reset_index()
    cells.loc[cells["count"] > 1, ["ci_low", "ci_high"]] = np.nan
    return cells


def _sort_key(row: tuple) -> tuple:
    """(model, compress, ...) with the uncompressed baseline first within a model."""
    return (row[0], row[1] != "none", *row[1:])


def _variant_rank(variant: str) -> tuple:
    return (VARIANT_ORDER.index(variant) if variant in VARIANT_ORDER else len(VARIANT_ORDER), variant)


def _in_order(cells: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """`cells` sorted like the tables: by row keys (baseline first), then variant."""
    labels = list(zip(*(cells[key] for key in keys), cells["variant"], strict=True))
    order = sorted(range(len(cells)), key=lambda i: (_sort_key(labels[i][:-1]), _variant_rank(labels[i][-1])))
    return cells.iloc[order]


def headline_table(analysis: str, rows: pd.DataFrame) -> Table:
    """Rows (model, compress[, group, split]) x columns metric[ (variant)] of the rows with no layer."""
    headline = rows[rows["layer"].isna()] if "layer" in rows else rows
    if headline.empty:
        return Table(analysis, [], [], ["only per-layer metrics; see the plots"])
    keys = _row_keys(headline)
    cells = _cells(headline, keys)
    columns: list[tuple[str, str]] = []
    for metric in dict.fromkeys(cells["metric"]):
        variants = sorted(set(cells.loc[cells["metric"] == metric, "variant"]), key=_variant_rank)
        columns += [(metric, variant) for variant in variants]
    n_variants = {metric: sum(1 for name, _ in columns if name == metric) for metric, _ in columns}
    header = keys + [
        metric if n_variants[metric] == 1 else f"{metric} ({variant})" for metric, variant in columns
    ]
    lookup = {}
    for cell in cells.itertuples(index=False):
        text = format_value(cell.value)
        if not (pd.isna(cell.ci_low) or pd.isna(cell.ci_high)):
            text += f" [{format_value(cell.ci_low)}, {format_value(cell.ci_high)}]"
        if cell.count > 1:
            text += AGGREGATED
        lookup[(*(getattr(cell, key) for key in keys), cell.metric, cell.variant)] = text
    row_labels = sorted(set(cells[keys].itertuples(index=False, name=None)), key=_sort_key)
    table_rows = [
        [*label, *(lookup.get((*label, *column), MISSING) for column in columns)] for label in row_labels
    ]
    notes = []
    if (cells["count"] > 1).any():
        notes.append(
            f"{AGGREGATED} mean of the rows behind the cell (up to {cells['count'].max()}, e.g. several "
            "seeds); CIs are not averaged, so none is shown"
        )
    return Table(analysis, header, table_rows, notes)


def _series_labels(frame: pd.DataFrame, names: Sequence[str]) -> pd.Series:
    return frame[list(names)].astype(str).agg(" / ".join, axis=1)


def make_plots(analysis: str, rows: pd.DataFrame, plots_dir: Path) -> tuple[list[Path], list[str]]:
    """Bar charts of headline metrics and curves over layers, capped per analysis; (paths, skipped)."""
    paths: list[Path] = []
    skipped: list[str] = []
    has_layer = rows["layer"].notna() if "layer" in rows else pd.Series(False, index=rows.index)
    headline, per_layer = rows[~has_layer], rows[has_layer]

    def save(figure: Figure, *name_parts: str) -> None:
        plots_dir.mkdir(parents=True, exist_ok=True)
        path = plots_dir / f"{safe_name(*name_parts)}.png"
        while path in paths:  # two names that only differ in unsafe characters
            path = path.with_name(f"{path.stem}_.png")
        write_atomic(path, lambda tmp: figure.savefig(tmp, format="png", dpi=110))
        paths.append(path)

    if not headline.empty:
        keys = _row_keys(headline)
        cells = _in_order(_cells(headline, keys), keys)
        cells = cells.assign(series=_series_labels(cells, ["variant", *keys[2:]]))
        metrics = list(dict.fromkeys(cells["metric"]))
        skipped += metrics[MAX_PLOTS_PER_ANALYSIS:]
        for metric in metrics[:MAX_PLOTS_PER_ANALYSIS]:
            save(bar_chart(cells[cells["metric"] == metric], f"{analysis}: {metric}"), analysis, metric)
    if not per_layer.empty:
        keys = _row_keys(per_layer)
        curves = _in_order(_cells(per_layer, keys, by=("metric", "variant", "layer")), keys)
        curves = curves.assign(series=_series_labels(curves, [*keys, "variant"]))
        metrics = list(dict.fromkeys(curves["metric"]))
        skipped += [f"{metric} (by layer)" for metric in metrics[MAX_PLOTS_PER_ANALYSIS:]]
        for metric in metrics[:MAX_PLOTS_PER_ANALYSIS]:
            figure = layer_chart(curves[curves["metric"] == metric], f"{analysis}: {metric} by layer")
            save(figure, analysis, metric, "by_layer")
    return paths, skipped


def _shown(path: Path, out_dir: Path) -> str:
    """A path relative to the report when it lies under it, absolute otherwise."""
    return str(path.relative_to(out_dir)) if path.is_relative_to(out_dir) else str(path)


def _failure(job: Job, done_hashes: set[str]) -> tuple[str, str]:
    """(status shown, error shown) for a job that contributed no rows."""
    status = job.status
    if job.problem:
        error = job.problem
    elif status == "failed":
        error = str(job.meta.get("error") or "(no error recorded)")
    elif status == "running":
        error = "not finished (interrupted or still running)"
        error += f": {job.meta['error']}" if job.meta.get("error") else ""
    else:
        error = f"unknown status {status!r}"
    if job.meta.get("config_hash") and str(job.meta["config_hash"]) in done_hashes:
        status += " (re-run done)"
    return status, " ".join(error.split())


def _md_cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(_md_cell, row)) + " |" for row in rows]


def render_markdown(
    tables: list[Table],
    failed: list[list[str]],
    superseded: list[str],
    plots: dict[str, list[str]],
    n_done: int,
    n_rows: int,
) -> str:
    """report.md: counts, one headline table per analysis, failed jobs, superseded re-runs, plots."""
    lines = [
        "# vlmsafe report",
        "",
        f"**{n_done}** jobs done, **{len(failed)}** failed or unfinished; vlmsafe {__version__}.",
        f"All {n_rows} rows: [summary.parquet](summary.parquet), [summary.csv](summary.csv).",
        "Headline tables show rows with no `layer`; per-layer curves are in the plots.",
    ]
    for table in tables:
        lines += ["", f"## {table.title}", ""]
        if table.header:
            lines += _md_table(table.header, table.rows)
        lines += [f"\n_{note}_" for note in table.notes]
    lines += ["", "## Failed jobs", ""]
    if failed:
        lines += _md_table(list(FAILED_HEADER), failed)
    else:
        lines.append("None.")
    if superseded:
        lines += [
            "",
            "## Superseded re-runs",
            "",
            "Older done runs of a config_hash run again (not in tables):",
        ]
        lines += [f"- {_md_cell(name)}" for name in superseded]
    lines += ["", "## Plots"]
    for analysis, names in plots.items():
        lines += ["", f"### {analysis}", ""] + [f"- [{name}](plots/{name})" for name in names]
    if not any(plots.values()):
        lines += ["", "None (no done job has rows)."]
    return "\n".join(lines) + "\n"


def _rich_table(
    title: str, header: list[str], rows: list[list[str]], n_keys: int, notes: list[str]
) -> RichTable:
    """A rich table of plain text (no markup); key columns never fold below their longest value."""
    table = RichTable(title=title, caption="; ".join(notes) or None)
    for index, name in enumerate(header):
        longest = max((len(row[index]) for row in rows), default=0) if index < n_keys else 0
        table.add_column(Text(name), overflow="fold", min_width=min(longest, 30) or None)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))
    return table


def _print(
    console: Console | None, tables: list[Table], failed: list[list[str]], out_dir: Path, n_plots: int
) -> None:
    """The headline tables and failed jobs as rich tables, then where the files went."""
    shown: list[RichTable | Text] = []
    for table in tables:
        n_keys = sum(1 for name in table.header if name in ("model", "compress", "group", "split"))
        if table.header:
            shown.append(_rich_table(table.title, table.header, table.rows, n_keys, table.notes))
        else:
            shown.append(Text(f"{table.title}: {'; '.join(table.notes)}"))
    if failed:
        shown.append(_rich_table("Failed jobs", list(FAILED_HEADER), failed, 3, []))
    shown.append(
        Text(f"Report written to {out_dir}: report.md, summary.parquet, summary.csv, {n_plots} plots")
    )
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped to a log: print tables at full width instead of folding at 80
            unbounded = console.options.update_width(10_000)
            widest = max(Measurement.get(console, unbounded, item).maximum for item in shown)
            console = Console(width=max(console.width, widest))
    for item in shown:
        console.print(item)


def build_report(
    paths: list[Path], out_dir: Path | None = None, console: Console | None = None
) -> ReportResult:
    """Join every job under `paths` into summary.parquet/.csv, report.md and plots/ in `out_dir`.

    `out_dir` defaults to the single path given, else the first one. Raises UserError for a
    missing path or when no job dir is found.
    """
    paths = [Path(path) for path in paths]
    if not paths:
        raise UserError("report: give at least one PATH (a job dir, a sweep dir or a tree above them)")
    jobs = [load_job(job_dir) for job_dir in find_job_dirs(paths)]
    done, superseded = keep_newest(job for job in jobs if job.ok)
    out_dir = Path(out_dir or paths[0]).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    summary = build_summary(done)
    summary_path = write_atomic(out_dir / "summary.parquet", lambda tmp: summary.to_parquet(tmp, index=False))
    summary_csv_path = write_atomic(out_dir / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))

    tables, plot_paths, plot_names = [], [], {}
    for analysis in dict.fromkeys(summary["analysis"].dropna()):
        rows = summary[summary["analysis"] == analysis]
        table = headline_table(analysis, rows)
        made, skipped = make_plots(analysis, rows, out_dir / "plots")
        if skipped:
            table.notes.append(f"not plotted (cap {MAX_PLOTS_PER_ANALYSIS} per kind): {', '.join(skipped)}")
        tables.append(table)
        plot_paths += made
        plot_names[analysis] = [path.name for path in made]

    done_hashes = {str(job.meta.get("config_hash")) for job in done}
    failed = [
        [
            _shown(job.job_dir, out_dir),
            str(job.meta.get("model", "")),
            str(job.meta.get("compress", "")),
            *_failure(job, done_hashes),
        ]
        for job in jobs
        if not job.ok
    ]
    superseded_names = [_shown(job.job_dir, out_dir) for job in superseded]
    markdown = render_markdown(tables, failed, superseded_names, plot_names, len(done), len(summary))
    report_path = write_atomic(out_dir / "report.md", lambda tmp: tmp.write_text(markdown, encoding="utf-8"))

    _print(console, tables, failed, out_dir, len(plot_paths))
    return ReportResult(
        out_dir=out_dir,
        n_done=len(done),
        n_failed=len(failed),
        summary_path=summary_path,
        summary_csv_path=summary_csv_path,
        report_path=report_path,
        plot_paths=plot_paths,
        superseded=[job.job_dir for job in superseded],
    )
