"""The runner end to end on tiny models: job dir contents, skip-if-done, failures, Ctrl-C, resume, cache."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from vlmsafe_cli.results import COLUMNS

TINY = "model=tiny-llama"


def job_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("job.json"))


def read_job(job_dir: Path) -> dict:
    return json.loads((job_dir / "job.json").read_text())


def test_single_job_writes_the_job_dir(cli, tmp_path):
    code, out, _ = cli("run", TINY, "compress=magnitude50", f"out_root={tmp_path}")
    assert code == 0, out
    (job_dir,) = job_dirs(tmp_path / "runs")
    for name in ("results.parquet", "results.csv", "job.json", "run.log", ".hydra/config.yaml"):
        assert (job_dir / name).is_file(), name
    record = read_job(job_dir)
    assert record["status"] == "done" and record["error"] is None
    assert set(record["stages"]) >= {"load", "compress", "write"}
    assert record["peak_rss_mb"] > 0 and len(record["config_hash"]) == 16
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    table = pd.read_parquet(job_dir / "results.parquet")
    assert list(table.columns) == COLUMNS
    assert table.equals(pd.read_csv(job_dir / "results.csv", dtype=table.dtypes.astype(str).to_dict()))
    sparsity = table[(table.metric == "sparsity_actual") & (table.variant == "compressed")]
    assert sparsity.value.tolist() == [0.5] and sparsity.group.tolist() == ["language_model"]
    assert table[(table.metric == "sparsity_actual") & (table.variant == "base")].value.tolist() == [0.0]
    assert set(table.model) == {"tiny-llama"} and set(table.compress) == {"magnitude50"}
    assert not list(job_dir.glob(".*.tmp")), "no temporary files left behind"


def test_failed_job_is_recorded_and_the_sweep_goes_on(cli, tmp_path):
    # The vision tower of tiny-llama does not exist: that job fails, the tiny-llava one still runs.
    code, _, err = cli(
        "run",
        "-m",
        "model=tiny-llama,tiny-llava",
        "compress=magnitude50",
        "compress.target=vision_tower",
        f"out_root={tmp_path}",
    )
    assert code == 1
    records = {read_job(d)["model"]: read_job(d) for d in job_dirs(tmp_path)}
    assert records["tiny-llama"]["status"] == "failed"
    assert "selects no linear layer" in records["tiny-llama"]["error"]
    assert records["tiny-llava"]["status"] == "done"
    assert "job failed" in err and "run.log" in err


def test_a_failing_analysis_keeps_the_rows_of_the_finished_ones(cli, tmp_path, monkeypatch):
    import vlmsafe_cli.job as job
    from vlmsafe_cli.results import row

    def entry(name):
        def run(workspace, settings):
            if name == "crosscoder":
                raise RuntimeError("the second analysis broke")
            return [row(name, "base", "finished_metric", 1.0)]

        return run

    monkeypatch.setattr(job, "entry_function", entry)
    code, _, err = cli("run", TINY, "analysis=[vlmsafe420,crosscoder]", f"out_root={tmp_path}")
    assert code == 1, err
    (job_dir,) = job_dirs(tmp_path)
    record = read_job(job_dir)
    assert record["status"] == "failed" and "the second analysis broke" in record["error"]
    table = pd.read_parquet(job_dir / "results.parquet")
    finished = table[table.metric == "finished_metric"]
    assert finished.analysis.tolist() == ["vlmsafe420"] and finished.value.tolist() == [1.0]


def test_done_job_is_skipped_and_force_reruns(cli, tmp_path):
    sweep = tmp_path / "sweep"
    args = ("run", "-m", TINY, "compress=none,magnitude50", f"hydra.sweep.dir={sweep}")
    assert cli(*args)[0] == 0
    first = {d: read_job(d)["finished"] for d in job_dirs(sweep)}
    code, out, _ = cli(*args)
    assert code == 0 and "0 done, 0 failed, 2 skipped" in out
    assert {d: read_job(d)["finished"] for d in job_dirs(sweep)} == first
    code, out, _ = cli(*args, "force=true")
    assert code == 0 and "2 done" in out


def test_interrupted_sweep_keeps_finished_jobs_and_resumes(cli, tmp_path, monkeypatch):
    import vlmsafe_cli.job as job

    real_compress = job.compress_model
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_compress(*args, **kwargs)

    monkeypatch.setattr(job, "compress_model", interrupt_second)
    sweep = tmp_path / "sweep"
    args = ("run", "-m", TINY, "compress=none,magnitude50", "seed=0,1", f"hydra.sweep.dir={sweep}")
    code, _, err = cli(*args)
    assert code == 130 and "interrupted" in err
    statuses = [read_job(d)["status"] for d in job_dirs(sweep)]
    assert statuses == ["done", "failed"]
    assert "interrupted" in read_job(job_dirs(sweep)[1])["error"]

    monkeypatch.setattr(job, "compress_model", real_compress)
    code, out, _ = cli(*args)
    assert code == 0 and "3 done, 0 failed, 1 skipped" in out
    assert [read_job(d)["status"] for d in job_dirs(sweep)] == ["done"] * 4


def test_compression_is_cached_across_jobs(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSAFE_CACHE", str(tmp_path / "cache"))
    for run_dir in ("a", "b"):
        assert cli("run", TINY, "compress=magnitude50", f"hydra.run.dir={tmp_path / run_dir}")[0] == 0
    assert read_job(tmp_path / "a")["compress_cache_hit"] is False
    assert read_job(tmp_path / "b")["compress_cache_hit"] is True
    first = pd.read_parquet(tmp_path / "a" / "results.parquet")
    second = pd.read_parquet(tmp_path / "b" / "results.parquet")
    keep = first.metric != "compress_seconds"
    pd.testing.assert_frame_equal(first[keep].reset_index(drop=True), second[keep].reset_index(drop=True))


def test_corrupt_compression_cache_entry_is_rebuilt(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMSAFE_CACHE", str(tmp_path / "cache"))
    assert cli("run", TINY, "compress=magnitude50", f"hydra.run.dir={tmp_path / 'a'}")[0] == 0
    (weights,) = (tmp_path / "cache" / "compressed").glob("*/weights.safetensors")
    weights.write_bytes(b"garbage")
    assert cli("run", TINY, "compress=magnitude50", f"hydra.run.dir={tmp_path / 'b'}")[0] == 0
    record = read_job(tmp_path / "b")
    assert record["status"] == "done" and record["compress_cache_hit"] is False
    assert "corrupt" in (tmp_path / "b" / "run.log").read_text()
    assert weights.stat().st_size > 1000


def test_missed_sparsity_fails_the_job(cli, tmp_path, monkeypatch):
    import vlmsafe_cli.compress.magnitude as magnitude

    monkeypatch.setenv("VLMSAFE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(magnitude, "kept_mask", lambda scores, *a, **k: scores >= 0)  # prunes nothing
    code, _, err = cli("run", TINY, "compress=magnitude50", f"out_root={tmp_path}")
    assert code == 1
    (job_dir,) = job_dirs(tmp_path)
    assert "missed its target" in read_job(job_dir)["error"]
    assert not (job_dir / "results.parquet").exists()


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-paligemma", "tiny-qwen2vl"])
def test_vlm_parts_can_be_targeted(cli, tmp_path, model):
    code, out, _ = cli(
        "run", f"model={model}", "compress=magnitude50", "compress.target=all", f"out_root={tmp_path}"
    )
    assert code == 0, out
    (job_dir,) = job_dirs(tmp_path)
    table = pd.read_parquet(job_dir / "results.parquet")
    compressed = table[(table.metric == "sparsity_actual") & (table.variant == "compressed")]
    assert set(compressed.group) == {"language_model", "vision_tower", "projector"}
    assert (compressed.value - 0.5).abs().max() <= 0.005


def test_n_m_pattern_is_verified(cli, tmp_path):
    code, out, _ = cli(
        "run",
        TINY,
        "compress=magnitude50",
        "compress.pattern=2:4",
        "compress.sparsity=0",
        f"out_root={tmp_path}",
    )
    assert code == 0, out
    table = pd.read_parquet(job_dirs(tmp_path)[0] / "results.parquet")
    valid = table[table.metric == "n_m_valid"].set_index("variant").value
    assert valid["compressed"] == 1.0 and valid["base"] < 0.01
