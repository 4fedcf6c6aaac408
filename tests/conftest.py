"""Shared fixtures: one model cache for the whole session, and the CLI called in-process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Build matplotlib's font cache now (a fresh machine has none), not inside a test whose stderr a Hydra run's
# leftover log handler would fill with matplotlib's INFO line about it.
from matplotlib import font_manager  # noqa: F401, E402

REPO = Path(__file__).resolve().parents[1]
# One cache for the session (kept between runs under .cache/, git-ignored) so the embedded tokenizer and
# model are converted once; tests that corrupt or count cache entries use their own directory.
os.environ.setdefault("VLMSAFE_CACHE", str(REPO / ".cache" / "test-cache"))
os.environ.pop("VLMSAFE_DEBUG", None)
TEST_PPL_SAMPLES = 2  # perplexity windows per job in CLI tests (default 16): ppl costs seconds on CPU


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `vlmsafe ARGS...` in this process; returns (exit code, stdout, stderr)."""
    from vlmsafe_cli.cli import main

    monkeypatch.delenv("VLMSAFE_INVOCATION", raising=False)

    test_device = os.environ.get("VLMSAFE_TEST_DEVICE")  # `make gpu-check` runs the suite on cuda

    def run(*args: str) -> tuple[int, str, str]:
        if test_device and args[:1] == ("run",) and not any(a.startswith("device=") for a in args):
            args = (*args, f"device={test_device}")
        if args[:1] == ("run",) and not any(a.startswith("compress.ppl_") for a in args):
            args = (*args, f"compress.ppl_samples={TEST_PPL_SAMPLES}")  # tests that measure ppl set their own
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        out, err = capsys.readouterr()
        return int(exited.value.code or 0), out, err

    return run
