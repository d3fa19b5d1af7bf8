"""Data parallelism across processes: one small object the stages receive.

Launched by `torchrun --nproc_per_node N` or `accelerate launch` (which set `RANK` and
`WORLD_SIZE`), each process takes a disjoint shard of the work: generation and evaluation a
shard of the prompts, extraction a shard of the batches. Generation writes one resumable part
file per process and the main process merges them in the examples' order; extraction sums the
Gram matrices across processes. Outside such a launch `Processes.current()` is a single process
and every stage runs as it always has.

The process group is accelerate's (`PartialState`: gloo on the CPU, NCCL on GPUs), the same one
training uses, so one launch can run every stage.

Example:
    >>> Processes.current().describe()
    {'rank': 0, 'world': 1}
    >>> Processes(rank=1, world=2).shard(5)
    [1, 3]
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from spd_lens.errors import SpdLensError


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one launch."""

    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if not (self.world >= 1 and 0 <= self.rank < self.world):
            raise SpdLensError(f"process rank {self.rank} of {self.world} is not a valid place: RANK must be in "
                               "0..WORLD_SIZE-1 (set by torchrun / accelerate launch)")

    @classmethod
    def current(cls) -> "Processes":
        """The launch this process belongs to, from `RANK` / `WORLD_SIZE` (one process without them)."""
        try:
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError as err:
            raise SpdLensError(f"RANK / WORLD_SIZE must be integers (torchrun sets them): {err}") from None
        return cls(rank, world)

    @property
    def parallel(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, int]:
        return {"rank": self.rank, "world": self.world}

    def shard(self, count: int) -> list[int]:
        """The indices of `count` items this process takes: every world-th, from its rank."""
        return list(range(self.rank, count, self.world))

    def barrier(self) -> None:
        """Waits until every process gets here (nothing to wait for alone)."""
        if self.parallel:
            _state().wait_for_everyone()

    def close(self) -> None:
        """Ends a launch cleanly: every process waits for the others, then leaves the process
        group. A process that simply exits while a peer is still connected can abort (SIGABRT)
        in gloo's teardown, failing a launch whose work was done."""
        if self.parallel and torch.distributed.is_initialized():
            state = _state()
            state.wait_for_everyone()
            state.destroy_process_group()

    def gather(self, value) -> list:
        """Every process's `value` (picklable), in rank order, on every process."""
        if not self.parallel:
            return [value]
        _state()  # the process group accelerate connects
        values: list = [None] * self.world
        torch.distributed.all_gather_object(values, value)
        return values

    def sum(self, tensor: Tensor) -> Tensor:
        """`tensor` summed over every process (a copy, on the tensor's own device and dtype)."""
        if not self.parallel:
            return tensor.clone()
        state = _state()
        # NCCL reduces only GPU tensors; gloo reduces CPU ones: the tensor visits the group's device.
        reduced = tensor.to(state.device if state.backend == "nccl" else "cpu", copy=True)
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
        return reduced.to(tensor.device)


def _state():
    from accelerate import PartialState

    # cpu=True where there is no GPU: without it accelerate leaves CPU processes unconnected. The
    # trainer's Accelerator(cpu=...) then finds the same group.
    return PartialState(cpu=not torch.cuda.is_available())
