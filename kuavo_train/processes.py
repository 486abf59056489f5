"""Side work shared between the processes of `accelerate launch`: the validation passes, EWC's
Fisher pass and the forgetting matrices' cells. Each process takes its contiguous part of the
items (accelerate's `split_between_processes`) and the results are gathered, in order, on every
process, so N processes do that work about N times faster and all end with what one process
computes alone. Inputs that would race if every process built them are built by the main
process alone (`on_main`). Without a launcher (one process) nothing is split and nothing is sent.

The split is decided by the launcher's WORLD_SIZE, not by whether an Accelerator exists yet:
`kuavo-train evaluate` under `accelerate launch` builds none, and its processes must still
split the cells rather than each write every one.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from kuavo_train.errors import KuavoError, first_line


class ElsewhereError(KuavoError):
    """Another process of the launch stopped (this one had nothing wrong)."""


class NotSharedError(KuavoError):
    """The launched processes do not see one folder (several machines without a shared file system)."""


def die_with_parent(parent_pid: int) -> None:
    """For a worker of a process pool: make Linux kill it when the process that started it dies.
    A parent killed outright (SIGKILL, out of memory) runs no clean-up, and its workers would go on
    writing and then wait forever, taking the cores of the rerun. The standard library has no
    wrapper for prctl, hence ctypes; elsewhere than Linux this does nothing."""
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os._exit(1)


def launched() -> bool:
    """Started by `accelerate launch` (or torchrun) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# How long a process waits for the others at a collective: the side work is split unevenly (a
# reused cell, a long closed-loop task) and the main process alone writes checkpoints, and NCCL's
# default of 10 minutes would abort a run whose one process is still evaluating.
TIMEOUT_HOURS = 2


def group_kwargs():
    """The process group's settings, for the Accelerator and for a bare PartialState alike."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(hours=TIMEOUT_HOURS))


def _state():
    import torch
    from accelerate import PartialState

    # the Accelerator's state when one exists; else (`kuavo-train evaluate`) gloo on a machine
    # without CUDA, where PartialState() alone would not join the processes
    return PartialState(cpu=not torch.cuda.is_available(), **group_kwargs().to_kwargs())


# Rank and size as the launcher sets them: reading them joins no process group.
def index() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


def count() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_count() -> int:
    """The launch's processes on this machine (the launcher sets LOCAL_WORLD_SIZE; without it, all)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(count())))


def spans_machines() -> bool:
    """The launch has processes on other machines too."""
    return count() > local_count()


def local_index() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    return index() == 0


def split_map(fn: Callable, items: Sequence) -> list:
    """[fn(x) for x in items], each process computing its part; the whole list on every process."""
    if not launched():
        return [fn(x) for x in items]
    from accelerate.utils import gather_object

    with _state().split_between_processes(list(items)) as mine:
        part = [fn(x) for x in mine]
    return gather_object(part)


def my_part(items: Sequence) -> list:
    """This process's contiguous part of `items` (all of them in one process)."""
    if not launched():
        return list(items)
    with _state().split_between_processes(list(items)) as mine:
        return list(mine)


def sum_over_processes(tensors: dict) -> dict:
    """Each tensor summed over the processes (on its own device: gloo on the CPU, NCCL on GPUs)."""
    if not launched():
        return tensors
    from accelerate.utils import reduce

    return reduce(tensors, reduction="sum")


def on_main(fn: Callable):
    """fn() in the main process alone while the others wait; its result on every process. For what
    would race if each process did it (building inputs into shared folders)."""
    if not launched():
        return fn()
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if _state().is_main_process:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - raised again below, on every process
            error = exc
    raise_together(error)
    return broadcast_object_list([result])[0]  # from the main process, once it is done


def raise_together(error: BaseException | None) -> None:
    """After a step each process did on its own: if one failed, every process stops (the one that
    failed with its error, the others with its line). Without it the others would go on to the
    next meeting point and wait there for the timeout, hours; a launcher stops them only on its
    own machine."""
    if not launched():
        if error is not None:
            raise error
        return
    from accelerate.utils import gather_object

    _state()  # the process group, if nothing has joined it yet
    said = gather_object([(index(), None if error is None else first_line(error))])
    if error is not None:
        raise error
    failed = [(i, line) for i, line in said if line is not None]
    if failed:
        raise ElsewhereError(f"process {failed[0][0]} of {count()} stopped: {failed[0][1]}")


def check_shared(path: Path, what: str) -> None:
    """Every process reads the bytes the main process has just written at `path`; else every process
    stops with the same line. Without this, on machines that do not share `what`, the others would
    train on statistics and run states of their own and then wait for ever at a meeting point
    the main process never reaches. Call it right after the processes have waited for the write."""
    if not launched():
        return
    from accelerate.utils import broadcast_object_list, gather_object

    path = Path(path)
    mine = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    main = broadcast_object_list([mine])[0]
    blind = [i for i, same in gather_object([(index(), mine == main)]) if not same]
    if blind:
        raise NotSharedError(
            f"{what} {path.parent} is not one folder for every process: process(es) {', '.join(map(str, blind))} "
            f"of {count()} do not see the {path.name} the main process has just written there; on several machines "
            f"{what}, the datasets and the base must be on a file system every machine sees (a shared mount)")


def wait() -> None:
    if launched():
        _state().wait_for_everyone()


def finish() -> None:
    """Leave the process group together at the end of a launched command. A process that exits
    while the group's communication threads still run aborts ("terminate called without an active
    exception", SIGABRT), and the launcher then fails the whole command."""
    if not launched():
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
