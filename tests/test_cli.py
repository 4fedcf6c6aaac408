"""The CLI surface: list, version, Hydra's --cfg/--help and shell completion through `vlmsafe run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

VLMSAFE = str(Path(sys.executable).with_name("vlmsafe"))


def test_list_groups_and_options(cli):
    code, out, _ = cli("list")
    assert code == 0
    for group in ("model", "compress", "analysis", "data", "judge", "experiment", "hydra/launcher"):
        assert group in out
    code, out, _ = cli("list", "hydra/launcher")
    assert code == 0 and "local_procs" in out and "slurm" in out and "SLURM" in out
    code, out, _ = cli("list", "compress")
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert {"magnitude50", "none", "rtn4", "rtn8", "int8", "nf4", "fp4"} <= set(lines)
    assert "magnitude pruning" in lines["magnitude50"] and "NF4" in lines["nf4"]


def test_version(cli):
    code, out, _ = cli("version")
    assert code == 0 and out.startswith("vlmsafe ") and "torch" in out


def test_cfg_job_prints_the_composed_config(cli):
    code, out, _ = cli(
        "run", "--cfg", "job", "model=tiny-llava", "compress=magnitude50", "compress.sparsity=0.3"
    )
    assert code == 0
    assert "name: tiny-llava" in out and "sparsity: 0.3" in out and "method: magnitude" in out


def test_shell_completion_through_the_run_subcommand():
    env = {**os.environ, "COMP_LINE": "vlmsafe run compress=mag", "COMP_POINT": "24"}
    done = subprocess.run([VLMSAFE, "-sc", "query=bash"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "compress=magnitude50" in done.stdout.split()
    script = subprocess.run([VLMSAFE, "run", "-sc", "install=bash"], capture_output=True, text=True)
    assert script.returncode == 0 and "complete" in script.stdout and "vlmsafe" in script.stdout


def test_hydra_help(cli):
    code, out, _ = cli("run", "--help")
    options = next(line for line in out.splitlines() if line.startswith("compress: ")).split(":", 1)[1]
    assert code == 0 and {"magnitude50", "none", "rtn4", "nf4"} <= set(options.replace(",", " ").split())
