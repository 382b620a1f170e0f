"""Multi-process runs (``accelerate launch``, ``torchrun``): main-process-only work that cannot hang
the other processes, and a clean tear-down.

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


def end_process_group(clean: bool) -> None:
    """Tear down torch.distributed before exit: left to interpreter shutdown, gloo can abort
    the process ("terminate called without an active exception"). After a clean run every rank
    first meets at a barrier, so no rank tears its connections down while a peer still uses them
    (a rank that failed skips it: its peers may never arrive)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
