"""Multi-process runs (``accelerate launch``, ``torchrun``): main-process-only work that cannot hang
the other processes, and an exit that gloo cannot turn into an abort.

Ranks, barriers and broadcasts come from ``torch.distributed`` (set up by Accelerate); this module
adds only the rule that every piece of work done by the main process alone, while the others wait,
goes through :func:`on_main`: if it fails there, every process raises, instead of the others
waiting at the next barrier for ever.
"""

from __future__ import annotations

from typing import Any, Callable

from .errors import InvalidInputError


def _group():
    """(rank, world size) of the initialised process group, or None for a single process."""
    import sys

    if "torch.distributed" not in sys.modules:  # (no group without it; and --help stays free of torch)
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return None


def on_main(fn: Callable[..., Any], *args: Any, share: bool = False, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on the main process only; every process leaves together.

    Collective: every process must call it. The others wait until the main process is done (so
    this is also a barrier), and if ``fn`` raised there, they raise too, with its message
    (``OSError`` for an ``OSError``, else ``InvalidInputError``), while the main process raises the
    original exception. Returns ``fn``'s result on the main process, and on every process with
    ``share`` (the result must then be picklable); else None elsewhere.
    """
    group = _group()
    if group is None:
        return fn(*args, **kwargs)
    import torch.distributed as dist

    result, failure = None, None
    if group[0] == 0:
        try:
            result = fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            failure = e
    box = [None if failure is None else (isinstance(failure, OSError), str(failure)), result if share else None]
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    if box[0] is not None:
        is_os_error, message = box[0]
        raise (OSError if is_os_error else InvalidInputError)(f"on the main process: {message}")
    return box[1] if share else result


def in_group() -> bool:
    """Whether this process is one of several in an initialised torch.distributed group."""
    return _group() is not None


def leave(code: int) -> None:
    """End this process of a multi-process run with exit status ``code``, without tearing gloo down.

    Left to interpreter shut-down, or to ``destroy_process_group`` while a peer is closing its own
    connections, gloo can abort the process ("terminate called without an active exception", status
    -6 instead of the run's own). So after a clean run (``code`` 0) every rank meets at a barrier, so
    that no rank goes while a peer still talks to it, and then each flushes its output and log
    handlers and ends with ``os._exit``: nothing is left for shut-down to tear down. A rank that
    failed skips the barrier (its peers may never arrive). Files are closed by then: every write in
    latentdiff is complete (atomic rename) before the command returns.

    Returns at once, doing nothing, in a single process: callers in the same process go on.
    """
    if not in_group():
        return
    import logging
    import os
    import sys

    import torch.distributed as dist

    if code == 0:
        try:
            dist.barrier()
        except Exception as e:  # noqa: BLE001 - a peer died after its work: this rank's is done
            print(f"latentdiff: warning: a peer process ended early ({e})", file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
