"""Bad input: exit code 2, one line on stderr naming the key/value and what is valid, nothing run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


def assert_user_error(result: tuple[int, str, str], *fragments: str) -> str:
    code, _, err = result
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_unknown_group_option_names_choices(cli, tmp_path):
    line = assert_user_error(
        cli("run", "model=tiny-llama", "compress=wanda99", f"out_root={tmp_path}"), "wanda99"
    )
    assert "magnitude50" in line and "none" in line


def test_unknown_option_in_a_list_group(cli, tmp_path):
    assert_user_error(cli("run", "analysis=[none,bogus]", f"out_root={tmp_path}"), "bogus", "analysis")


def test_misspelled_key_lists_valid_keys(cli, tmp_path):
    line = assert_user_error(cli("run", "model=tiny-llama", "compress.sparsty=0.5", f"out_root={tmp_path}"))
    assert "compress.sparsty" in line and "sparsity" in line


def test_wrong_type(cli, tmp_path):
    assert_user_error(
        cli("run", "model=tiny-llama", "compress.sparsity=half", f"out_root={tmp_path}"),
        "compress.sparsity",
        "half",
    )


def test_out_of_range_value(cli, tmp_path):
    assert_user_error(
        cli(
            "run", "model=tiny-llama", "compress=magnitude50", "compress.sparsity=1.5", f"out_root={tmp_path}"
        ),
        "compress.sparsity=1.5",
        "[0, 1)",
    )


def test_bad_n_m_pattern(cli, tmp_path):
    assert_user_error(
        cli(
            "run", "model=tiny-llama", "compress=magnitude50", "compress.pattern=4:2", f"out_root={tmp_path}"
        ),
        "compress.pattern",
    )


def test_bad_target(cli, tmp_path):
    assert_user_error(
        cli(
            "run",
            "model=tiny-llama",
            "compress=magnitude50",
            "compress.target=decoder",
            f"out_root={tmp_path}",
        ),
        "compress.target",
        "language_model",
    )


def test_bad_value_in_one_job_of_a_sweep_stops_everything(cli, tmp_path):
    assert_user_error(
        cli(
            "run",
            "-m",
            "model=tiny-llama",
            "compress=none,magnitude50",
            "compress.sparsity=2",
            f"out_root={tmp_path}",
        ),
        "compress.sparsity",
    )
    assert not (tmp_path / "multirun").exists() or not any((tmp_path / "multirun").rglob("job.json"))


def test_sweep_without_multirun_flag(cli, tmp_path):
    assert_user_error(cli("run", "model=tiny-llama,tiny-llava", f"out_root={tmp_path}"), "-m")


def test_missing_model_path(cli, tmp_path):
    assert_user_error(
        cli("run", "model=smollm2", f"model.path={tmp_path / 'nowhere'}", f"out_root={tmp_path}"),
        "model.path",
        "does not exist",
    )


def test_hub_model_without_network(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    line = assert_user_error(
        cli("run", "model=smollm2", "model.source=hub", f"out_root={tmp_path}"),
        "not available offline",
        "model.path=",
    )
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when no GPU is present")
def test_cuda_requested_without_gpu(cli, tmp_path):
    assert_user_error(
        cli("run", "model=tiny-llama", "device=cuda", f"out_root={tmp_path}"), "device=cuda", "device=cpu"
    )


def test_unwritable_output_dir(cli, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert_user_error(
        cli("run", "model=tiny-llama", f"out_root={blocker / 'out'}"), "not writable", "out_root="
    )


def test_report_on_dir_without_jobs(cli, tmp_path):
    assert_user_error(cli("report", str(tmp_path)), str(tmp_path))


def test_list_unknown_group(cli):
    assert_user_error(cli("list", "compresion"), "compresion", "compress")


def test_console_script_exit_code_and_debug_traceback(tmp_path):
    """The installed entry point: exit 2 and one line; VLMSAFE_DEBUG=1 shows the traceback."""
    vlmsafe = Path(sys.executable).with_name("vlmsafe")
    args = [str(vlmsafe), "run", "compress=nope", f"out_root={tmp_path}"]
    plain = subprocess.run(args, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "nope" in plain.stderr
    debug = subprocess.run(
        args, capture_output=True, text=True, env={**__import__("os").environ, "VLMSAFE_DEBUG": "1"}
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_multirun_with_cfg_is_one_line(cli):
    assert_user_error(cli("run", "--cfg", "job", "-m", "model=tiny-llama"), "one of -m, --cfg")
