"""Logging for rule scripts: everything a step prints goes to its Snakemake log file."""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Iterator


def make_logger(stream=None) -> Callable[[str], None]:
    """A print-like function that stamps each line with the wall-clock time."""

    def log(message: str) -> None:
        out = stream or sys.stdout
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=out, flush=True)

    return log


@contextlib.contextmanager
def redirect_log(path: str | Path | None) -> Iterator[Callable[[str], None]]:
    """Send stdout/stderr to ``path`` (line-buffered) for the block; log and re-raise errors.

    A failing step leaves its traceback in its own log, and its one-line reason on stderr where
    Snakemake shows it.
    """
    if path is None:
        yield make_logger()
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    old_out, old_err = sys.stdout, sys.stderr
    with open(path, "w", buffering=1) as handle:
        sys.stdout = sys.stderr = handle
        try:
            yield make_logger(handle)
        except BaseException as err:
            traceback.print_exc(file=handle)
            print(f"convviz: {err.__class__.__name__}: {err} (full log: {path})", file=old_err, flush=True)
            raise
        finally:
            sys.stdout, sys.stderr = old_out, old_err
