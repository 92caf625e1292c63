"""Work split over the processes of torch.distributed: which batches are this process's, and the parts put together.

Under `torchrun --nproc_per_node N` (or `accelerate launch`) N processes run the same program. Work that is a list of
batches is split by batch: the batches are formed exactly as one process forms them, and process `r` of `N` runs
batches `r, r + N, r + 2N, ...`. Each batch, and so each batch's result, is then the very one a single process
computes. Partial sums are added with `all_reduce` in float64 ([`all_reduce_sum`]); per-item results are gathered
and put back in the one-process order ([`gather_owned`]). Statistics therefore equal one process's up to the order
of float64 additions, and evaluation results equal them exactly (on hardware that computes a batch the same way in
every process).

The same code serves CPUs (backend gloo) and GPUs (backend NCCL): tensors travel on the device the group's backend
needs. [`init_from_environment`] starts the default group from the variables `torchrun` and `accelerate launch`
set, choosing NCCL when CUDA is available and gloo otherwise.

Example:
    ```python
    >>> from hf_edit_patch.distributed import current_processes, gather_owned
    >>> procs = current_processes()  # doctest: +SKIP
    >>> mine = {i: work(batches[i]) for i in procs.owned(len(batches))}  # doctest: +SKIP
    >>> results = gather_owned(mine, len(batches), procs)  # doctest: +SKIP
    ```
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import PatchError

__all__ = [
    "Processes",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "current_processes",
    "gather_owned",
    "init_from_environment",
    "launched",
    "launched_processes",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of a torch.distributed group.

    Args:
        rank: this process's rank in the group (0 is the one that writes files).
        world: the number of processes.
        group: the process group (None: the default group).
    """

    rank: int
    world: int
    group: Any = None

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    def owned(self, n: int) -> range:
        """The indices of `n` items (batches) this process runs: `rank, rank + world, ...`."""
        return range(self.rank, n, self.world)


def current_processes(group: Any = None) -> Processes:
    """The rank and size of the initialized process group (the default one unless `group` is given).

    Raises:
        PatchError: torch.distributed is not available or no process group was initialized; the message says how
            to start one.

    Example:
        ```python
        >>> current_processes()  # doctest: +SKIP
        Processes(rank=1, world=2, group=None)
        ```
    """
    if not dist.is_available() or not dist.is_initialized():
        raise PatchError(
            "distributed=True needs an initialized torch.distributed process group: launch with `torchrun "
            "--nproc_per_node N ...` (or `accelerate launch`) and call torch.distributed.init_process_group() "
            "(or hf_edit_patch.distributed.init_from_environment()) first"
        )
    return Processes(dist.get_rank(group), dist.get_world_size(group), group)


def launched_processes() -> int:
    """How many processes the launcher started (`WORLD_SIZE`; 1 when not launched by torchrun or accelerate)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init_from_environment(backend: str | None = None) -> Processes | None:
    """Starts the default process group when a launcher started several processes; None for a single process.

    The backend is `backend`, else NCCL where CUDA is available (each process then uses GPU `LOCAL_RANK`) and gloo
    otherwise. An already initialized group is used as it is.

    Example:
        ```python
        >>> procs = init_from_environment()  # under `torchrun --nproc_per_node 2`  # doctest: +SKIP
        >>> procs.rank, procs.world  # doctest: +SKIP
        (0, 2)
        ```
    """
    if dist.is_available() and dist.is_initialized():
        return current_processes()
    if launched_processes() == 1:
        return None
    if not dist.is_available():
        raise PatchError("several processes were launched, but this torch build has no torch.distributed")
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return current_processes()


@contextlib.contextmanager
def launched(backend: str | None = None) -> Iterator[Processes | None]:
    """`init_from_environment` for the length of a `with` block; a group it started is destroyed on leaving.

    Example:
        ```python
        >>> with launched() as procs:  # None for a single process  # doctest: +SKIP
        ...     moments = get_second_moments(model, tokenizer, modules, distributed=procs is not None, ...)
        ```
    """
    started = not (dist.is_available() and dist.is_initialized())
    procs = init_from_environment(backend)
    try:
        yield procs
    finally:
        if procs is not None and started and dist.is_initialized():
            dist.destroy_process_group()


def _transport_device(procs: Processes) -> torch.device:
    """The device tensors travel on: the current GPU for NCCL, the CPU for gloo and the others."""
    if str(dist.get_backend(procs.group)).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor, procs: Processes) -> torch.Tensor:
    """The sum of `tensor` over all processes, in float64, on `tensor`'s device (`tensor` is left as it was).

    Example:
        ```python
        >>> total = all_reduce_sum(partial_sum, procs)  # doctest: +SKIP
        ```
    """
    moving = tensor.detach().to(device=_transport_device(procs), dtype=torch.float64, copy=True)
    dist.all_reduce(moving, op=dist.ReduceOp.SUM, group=procs.group)
    return moving.to(tensor.device)


def all_reduce_int(value: int, procs: Processes, op: str = "sum") -> int:
    """An integer summed (`op="sum"`), or its minimum or maximum (`"min"`, `"max"`), over all processes."""
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    moving = torch.tensor([value], dtype=torch.int64, device=_transport_device(procs))
    dist.all_reduce(moving, op=ops[op], group=procs.group)
    return int(moving.item())


def gather_owned(local: Mapping[int, T], n: int, procs: Processes) -> list[T]:
    """The results of all `n` items in item order, from each process's `{index: result}` of the items it owns.

    Results travel pickled (`all_gather_object`), so they are moved to the CPU first by the caller when they are
    tensors on an accelerator.

    Raises:
        PatchError: an item no process computed, or one computed twice.
    """
    parts: list[Any] = [None] * procs.world
    dist.all_gather_object(parts, dict(local), group=procs.group)
    merged: dict[int, T] = {}
    for part in parts:
        for index, value in part.items():
            if index in merged:
                raise PatchError(f"item {index} was computed by two processes; each item must have one owner")
            merged[index] = value
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise PatchError(f"no process computed item(s) {missing[:5]} of {n}: the processes split the work differently")
    return [merged[i] for i in range(n)]


def broadcast_object(value: T, procs: Processes, src: int = 0) -> T:
    """Rank `src`'s `value` on every process (pickled; what the other ranks pass is ignored)."""
    box = [value if procs.rank == src else None]
    dist.broadcast_object_list(box, src=src, group=procs.group)
    return box[0]


def barrier(procs: Processes) -> None:
    """Waits until every process reaches this point."""
    dist.barrier(group=procs.group)
