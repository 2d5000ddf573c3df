"""Writing a file whole: readers (another process of the job, or a run killed and resumed) see the old contents or
the new, never a file cut short. Standard library only, so data-loading modules and their worker processes can use
it without importing jax."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so writers that go by it still do) for the caller to write;
    on success it replaces `path` in one rename, on failure it is removed. A reader (another process, or a run
    killed and resumed) sees the old contents or the new, never a file cut short; a failed write keeps the old."""
    partial = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def replace_text(path: Path, text: str) -> None:
    """Write `path` whole (see `replaced`)."""
    with replaced(path) as partial:
        partial.write_text(text)
