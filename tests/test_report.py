"""`vlmsafe report`: joining fake job dirs into summary tables, report.md and plots (no models)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from rich.console import Console

from vlmsafe_cli.errors import UserError
from vlmsafe_cli.report import build_report, format_value

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODELS = ("tiny-llama", "tiny-llava")
COMPRESSIONS = ("none", "magnitude50")


def quiet_console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, width=200, force_terminal=False), buffer


def job_rows(model: str, compress: str, config_hash: str, scale: float = 1.0) -> pd.DataFrame:
    """Rows a real job would write: compression numbers, a refusal rate with CIs, a per-layer cosine."""
    sparsity = 0.5 if compress != "none" else 0.0
    rows = [
        ("compression", "base", "n_params", 1_234_567.0, None, None, None),
        ("compression", "compressed", "n_params", 1_234_567.0, None, None, None),
        ("compression", "base", "sparsity_actual", 0.0, None, None, None),
        ("compression", "compressed", "sparsity_actual", sparsity, None, None, None),
        ("compression", "compressed", "size_mb", 4.7 * scale, None, None, None),
        ("refusal_direction", "base", "refusal_rate", 0.9, 0.8, 0.95, None),
        ("refusal_direction", "compressed", "refusal_rate", 0.9 - sparsity * scale, 0.3, 0.7, None),
    ]
    rows += [
        ("refusal_direction", "comparison", "cos_layer", 1.0 - 0.1 * layer, None, None, layer)
        for layer in range(4)
    ]
    frame = pd.DataFrame(
        rows, columns=["analysis", "variant", "metric", "value", "ci_low", "ci_high", "layer"]
    )
    return frame.assign(
        model=model, compress=compress, n=100, seed=0, config_hash=config_hash, vlmsafe_version="0.1.0"
    )


def write_job(
    job_dir: Path,
    model: str,
    compress: str,
    config_hash: str,
    status: str = "done",
    error: str | None = None,
    finished: str = "2026-11-22T10:00:05",
    rows: pd.DataFrame | None = None,
) -> int:
    """A job dir as the runner leaves it; returns how many result rows it holds."""
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "config.yaml").write_text(f"model: {model}\n")
    meta = {
        "status": status, "error": error, "model": model, "compress": compress, "analyses": ["none"],
        "config_hash": config_hash, "seed": 0, "device": "cpu", "stages": {"load": 1.2},
        "peak_rss_mb": 812.5, "peak_gpu_mb": None, "versions": {}, "vlmsafe_version": "0.1.0",
        "started": "2026-11-22T10:00:00", "finished": finished, "job_dir": str(job_dir),
        "overrides": [f"model={model}", f"compress={compress}"],
    }  # fmt: skip
    (job_dir / "job.json").write_text(json.dumps(meta))
    if status != "done":
        return 0
    rows = job_rows(model, compress, config_hash) if rows is None else rows
    rows.to_parquet(job_dir / "results.parquet", index=False)
    rows.to_csv(job_dir / "results.csv", index=False)
    return len(rows)


def make_sweep(sweep_dir: Path) -> int:
    """4 done jobs (2 models x 2 compressions) and 1 failed job; returns the number of result rows."""
    n_rows, index = 0, 0
    for model in MODELS:
        for compress in COMPRESSIONS:
            n_rows += write_job(sweep_dir / str(index), model, compress, f"hash{index}")
            index += 1
    write_job(sweep_dir / str(index), "tiny-llava", "wanda50", "hash-failed", "failed", "CUDA out of memory")
    return n_rows


def assert_valid_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()


def test_report_joins_a_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "2026-11-22" / "10-00-00"
    n_rows = make_sweep(sweep)
    (sweep / "0" / ".hydra" / "job.json").write_text("{}")  # a job.json inside .hydra is not a job
    console, printed = quiet_console()

    result = build_report([sweep], console=console)

    assert result.out_dir == sweep.resolve()
    assert (result.n_done, result.n_failed) == (4, 1)
    summary = pd.read_parquet(result.summary_path)
    assert len(summary) == n_rows
    assert len(pd.read_csv(result.summary_csv_path)) == n_rows
    assert summary["job_dir"].nunique() == 4
    assert {"model", "compress", "analysis", "variant", "metric", "value", "layer"} <= set(summary.columns)

    report = result.report_path.read_text()
    assert "4** jobs done, **1** failed" in report
    for model in MODELS:
        for compress in COMPRESSIONS:
            assert f"| {model} | {compress} |" in report
    assert "sparsity_actual (compressed)" in report  # a metric with two variants names the variant
    assert "| size_mb |" in report  # one variant: the metric name alone
    assert "0.400 [0.300, 0.700]" in report  # CIs next to the value, 3 decimals
    assert "1,234,567" in report
    assert "cos_layer" not in report.split("## refusal_direction")[1].split("##")[0]  # per-layer: plots only
    failed_section = report.split("## Failed jobs")[1]
    assert "CUDA out of memory" in failed_section and "wanda50" in failed_section

    names = {path.name for path in result.plot_paths}
    assert {"compression__n_params.png", "refusal_direction__refusal_rate.png"} <= names
    assert "refusal_direction__cos_layer__by_layer.png" in names
    for path in result.plot_paths:
        assert_valid_png(path)
        assert f"(plots/{path.name})" in report

    output = printed.getvalue()
    assert "refusal_direction" in output and "tiny-llava" in output and "CUDA out of memory" in output
    assert str(sweep.resolve()) in output.replace("\n", "")
    assert not list(sweep.glob(".*.tmp")) and not list((sweep / "plots").glob(".*.tmp"))


def test_no_job_dirs_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "empty" / ".hydra").mkdir(parents=True)
    (tmp_path / "empty" / ".hydra" / "job.json").write_text("{}")
    with pytest.raises(UserError, match="no job dirs") as info:
        build_report([tmp_path / "empty"], console=quiet_console()[0])
    assert str(tmp_path / "empty") in str(info.value) and "\n" not in str(info.value)


def test_missing_path_is_a_user_error(tmp_path: Path) -> None:
    make_sweep(tmp_path / "sweep")
    with pytest.raises(UserError, match="does not exist") as info:
        build_report([tmp_path / "sweep", tmp_path / "nope"], console=quiet_console()[0])
    assert str(tmp_path / "nope") in str(info.value)


def test_duplicate_hash_keeps_newest(tmp_path: Path) -> None:
    old_rows = job_rows("tiny-llama", "magnitude50", "same", scale=1.0)
    new_rows = job_rows("tiny-llama", "magnitude50", "same", scale=2.0)
    write_job(tmp_path / "a" / "0", "tiny-llama", "magnitude50", "same", finished="2026-11-22T11:00:00",
              rows=new_rows)  # fmt: skip
    write_job(tmp_path / "b" / "0", "tiny-llama", "magnitude50", "same", finished="2026-11-22T10:00:00",
              rows=old_rows)  # fmt: skip

    result = build_report([tmp_path], console=quiet_console()[0])

    assert result.n_done == 1 and result.superseded == [(tmp_path / "b" / "0").resolve()]
    summary = pd.read_parquet(result.summary_path)
    assert len(summary) == len(new_rows)
    assert set(summary["job_dir"]) == {str((tmp_path / "a" / "0").resolve())}
    size = summary.loc[summary["metric"] == "size_mb", "value"]
    assert size.tolist() == pytest.approx([9.4])
    assert "Superseded re-runs" in result.report_path.read_text()


def test_unfinished_and_broken_jobs_are_listed(tmp_path: Path) -> None:
    write_job(tmp_path / "0", "tiny-llama", "none", "h0")
    write_job(tmp_path / "1", "tiny-llama", "wanda50", "h1", status="running")
    write_job(tmp_path / "2", "tiny-llama", "gptq4", "h2")
    (tmp_path / "2" / "results.parquet").unlink()
    (tmp_path / "2" / "results.csv").unlink()
    out_dir = tmp_path / "report"

    result = build_report([tmp_path / "0", tmp_path / "1", tmp_path / "2"], out_dir=out_dir,
                          console=quiet_console()[0])  # fmt: skip

    assert result.out_dir == out_dir.resolve() and result.report_path.parent == out_dir.resolve()
    assert (result.n_done, result.n_failed) == (1, 2)
    failed_section = result.report_path.read_text().split("## Failed jobs")[1]
    assert "| running |" in failed_section and "not finished" in failed_section
    assert "no results.parquet or results.csv" in failed_section


def test_only_failed_jobs_still_report_them_without_a_tty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_job(tmp_path / "0", "tiny-llama", "wanda50", "h0", status="failed", error="bad | value")
    write_job(tmp_path / "1", "tiny-llama", "none", "h1", status="failed", error="x" * 150)

    result = build_report([tmp_path])  # default Console; pytest's stdout is not a terminal

    assert (result.n_done, result.n_failed, result.plot_paths) == (0, 2, [])
    assert pd.read_parquet(result.summary_path).empty
    assert "bad \\| value" in result.report_path.read_text()  # a pipe cannot break the markdown table
    printed = capsys.readouterr().out
    assert "bad | value" in printed and "x" * 150 in printed  # printed at full width, not folded
    assert "\x1b[" not in printed  # no colour codes in a log


def test_several_rows_per_cell_are_averaged_and_marked(tmp_path: Path) -> None:
    for seed in range(2):
        rows = job_rows("tiny-llama", "magnitude50", f"seed{seed}", scale=1.0 + seed).assign(seed=seed)
        write_job(tmp_path / str(seed), "tiny-llama", "magnitude50", f"seed{seed}", rows=rows)

    report = build_report([tmp_path], console=quiet_console()[0]).report_path.read_text()

    assert "7.050†" in report  # mean of size_mb 4.7 and 9.4
    assert "CIs are not averaged" in report


def test_format_value() -> None:
    assert format_value(0.85234) == "0.852"
    assert format_value(0.0) == "0.000"
    assert format_value(1234567.0) == "1,234,567"
    assert format_value(0.0000123) == "1.23e-05"
    assert format_value(float("nan")) == "—"
