"""What a trainer does across the processes of a distributed run (`accelerate launch`): which device
it runs on, and the collectives that keep every process taking the same step. With one process each
collective is the identity.

    >>> use_cpu_accelerator()   # on a machine without CUDA                    # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import warnings

import torch


def use_cpu_accelerator() -> bool:
    """Whether this process runs on the CPU: no CUDA device, or more processes on this node than
    GPUs (NCCL needs a GPU of its own per process: the run then uses gloo on the CPU)."""
    if not torch.cuda.is_available():
        return True
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local_processes > torch.cuda.device_count():
        warnings.warn(
            f"{local_processes} processes on this node share {torch.cuda.device_count()} GPU(s); NCCL needs one GPU per "
            f"process, so this run uses the CPU (gloo). Launch at most {torch.cuda.device_count()} processes per node "
            "(accelerate launch --num_processes N) to train on the GPUs.",
            stacklevel=2,
        )
        return True
    return False


class Collectives:
    """The trainer's collectives over `self.accelerator`'s processes (on `self.device`)."""

    def reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean over processes (identity with one process): every process then takes the same step."""
        if self.accelerator.num_processes == 1:
            return tensor
        return self.accelerator.reduce(tensor.contiguous(), reduction="mean")

    def average_gradients(self, params) -> None:
        """Replace each gradient by its mean over processes, so every optimizer takes one step."""
        for p in params:
            if p.grad is not None:
                p.grad = self.reduce_mean(p.grad)

    def any_process(self, flag: bool) -> bool:
        """True on every process if `flag` is true on any, so all of them take the same branch."""
        if self.accelerator.num_processes == 1:
            return flag
        return self.accelerator.reduce(torch.tensor(float(flag), device=self.device), reduction="sum").item() > 0

    def wait_for_everyone(self) -> None:
        """A barrier across processes. On the CPU it is gloo's plain barrier: accelerate's names a
        device index, which on a machine that has fewer GPUs than processes (the CPU fallback of
        `use_cpu_accelerator`) points at a GPU that does not exist."""
        if self.accelerator.num_processes == 1:
            return
        if self.device.type == "cpu":
            torch.distributed.barrier()
        else:
            self.accelerator.wait_for_everyone()

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process
