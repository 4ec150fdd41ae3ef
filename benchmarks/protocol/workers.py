"""Local worker processes: spawned, ended with their parent, stopped on Ctrl-C.

:func:`local_processes` runs a function in ``count`` spawned processes for the length of
a block; ``benchmarks.run --workers K`` shares its units out to them and
``benchmarks.tune --workers K`` runs a study's trials in them. A spawned process
imports its target by module path, so targets are module-level functions.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["INTERRUPT_GRACE_S", "LOG_FORMAT", "local_processes"]

LOG_FORMAT = "%(name)s %(levelname)s: %(message)s"  # of every process's log lines
INTERRUPT_GRACE_S = 30.0  # after Ctrl-C, how long workers may take to stop by themselves


def _exit_with_parent() -> None:
    """In a spawned worker: end this process as soon as its parent is gone.

    A parent killed without a chance to stop its workers (SIGKILL, the OOM killer)
    would otherwise leave them training, and a rerun would start more on the same folders.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


def _watched(target: Callable[..., None], args: tuple[Any, ...], pml_log_level: int) -> None:
    """A worker process's body: ``target(*args)``, ended if the parent dies first, with
    the parent's level for PML's logger (``--verbose``), which a spawned process does not
    inherit."""
    _exit_with_parent()
    logging.basicConfig(format=LOG_FORMAT)
    logging.getLogger("PML").setLevel(pml_log_level)
    target(*args)


@contextlib.contextmanager
def local_processes(
    target: Callable[..., None], args: tuple[Any, ...], count: int
) -> Iterator[list[multiprocessing.process.BaseProcess]]:
    """``count`` spawned processes, each running ``target(*args)``, for the block.

    Each logs PML's messages at this process's level and ends by itself when this process
    dies without stopping it. Leaving the block joins them. When the block raised they are
    terminated first; on Ctrl-C (which they receive too) they get ``INTERRUPT_GRACE_S``
    seconds to stop by themselves. A process that exited with a nonzero status is a
    RuntimeError.
    """
    context = multiprocessing.get_context("spawn")
    processes: list[multiprocessing.process.BaseProcess] = []
    try:
        for _ in range(count):
            level = logging.getLogger("PML").getEffectiveLevel()
            processes.append(context.Process(target=_watched, args=(target, args, level)))
            processes[-1].start()
        yield processes
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            for process in processes:
                process.join(timeout=INTERRUPT_GRACE_S)
        for process in processes:
            if process.is_alive():
                process.terminate()
        raise
    finally:
        for process in processes:
            process.join()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"{len(failed)} of {count} worker processes exited with {failed}")
