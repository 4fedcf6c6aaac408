"""Progress on long loops: a rich progress bar on a terminal, plain log lines otherwise (CI, SLURM)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
log = logging.getLogger("vlmsafe.progress")


def interactive() -> bool:
    return sys.stderr.isatty()


def track(
    items: Iterable[T], description: str, total: Optional[int] = None, min_seconds: float = 2.0
) -> Iterator[T]:
    """Yield `items`, showing progress; plain: logs at the end and every 10%, `min_seconds` apart."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if interactive():
        from rich.progress import track as rich_track

        yield from rich_track(items, description=description, total=total, transient=True)
        return
    start = last = time.perf_counter()
    step = max(1, -(-(total or 10) // 10))
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.perf_counter()
        if total and (done == total or (done % step == 0 and now - last >= min_seconds)):
            log.info("%s: %d/%d (%.1fs)", description, done, total, now - start)
            last = now
    if not total:
        log.info("%s: %d done (%.1fs)", description, done, time.perf_counter() - start)
