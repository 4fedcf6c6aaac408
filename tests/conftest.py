"""Shared fixtures: one model cache for the whole session, and the CLI called in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# One cache for the session (kept between runs under .cache/, git-ignored) so the embedded tokenizer and
# model are converted once; tests that corrupt or count cache entries use their own directory.
os.environ.setdefault("VLMSAFE_CACHE", str(REPO / ".cache" / "test-cache"))
os.environ.pop("VLMSAFE_DEBUG", None)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `vlmsafe ARGS...` in this process; returns (exit code, stdout, stderr)."""
    from vlmsafe_cli.cli import main

    monkeypatch.delenv("VLMSAFE_INVOCATION", raising=False)

    test_device = os.environ.get("VLMSAFE_TEST_DEVICE")  # `make gpu-check` runs the suite on cuda

    def run(*args: str) -> tuple[int, str, str]:
        if test_device and args[:1] == ("run",) and not any(a.startswith("device=") for a in args):
            args = (*args, f"device={test_device}")
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        out, err = capsys.readouterr()
        return int(exited.value.code or 0), out, err

    return run
