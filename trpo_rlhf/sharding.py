"""The frozen base sharded across processes with FSDP2 (PyTorch's `fully_shard`; Zhao et al. 2023,
"PyTorch FSDP"), for `accelerate launch --config_file recipes/accelerate_configs/fsdp.yaml`.

Each decoder layer's frozen weights are split across the processes and gathered for that layer's
forward (and backward) only, so a process holds about 1/N of the layers at rest. The tensors the
update moves (both LoRA adapters and the value head) stay whole on every process: the trainer
averages their gradients, Fisher quadratics and line-search measurements itself, as with
replicated models. So do the embeddings, the final norm and the LM head, which the critic's
backbone pass and tied embeddings share between modules.

    >>> fsdp_requested("MULTI_CPU", {"ACCELERATE_USE_FSDP": "true"})
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from accelerate.utils import DistributedType


def fsdp_requested(distributed_type: DistributedType | str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the processes were launched to shard with FSDP: accelerate reports FSDP on GPUs; on
    CPU processes (gloo) it reports MULTI_CPU, and only the launcher's environment says FSDP."""
    kind = DistributedType(distributed_type)
    if kind == DistributedType.FSDP:
        return True
    return kind == DistributedType.MULTI_CPU and environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` whose class transformers names as not to be split (`_no_split_modules`:
    the decoder layers, e.g. LlamaDecoderLayer, GPT2Block)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def shard_frozen_base(model: torch.nn.Module, replicated: Iterable[torch.Tensor], device_type: str) -> int:
    """Shard every decoder layer of `model` across the processes of the default process group,
    keeping `replicated` tensors (the trainable ones) whole on every process; each shard is moved to
    this process's `device_type` device. Returns the number of sharded layers.

    Each layer's weights are gathered before its forward and freed after it, and gathered again for
    its backward: a single backward per forward, which the one-iteration TRPO step and PPO take.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    if not layers:
        raise ValueError(
            f"FSDP: {type(model).__name__} names no decoder layer classes (`_no_split_modules`), so there is "
            "nothing to shard layer by layer. Launch with recipes/accelerate_configs/multi_gpu.yaml instead."
        )
    mesh = init_device_mesh(device_type, (torch.distributed.get_world_size(),))
    replicated = {id(t) for t in replicated}
    for layer in reversed(layers):  # a nested layer before the layer around it, as FSDP2 needs
        keep = {p for p in layer.parameters() if id(p) in replicated}
        # Explicitly True: each layer is its own FSDP root, and a root left to the default keeps its
        # weights gathered after a forward (expecting a backward next), so every no-graph forward
        # (generation, the rollout, the line search) would leave the whole base gathered.
        fully_shard(layer, mesh=mesh, ignored_params=keep, reshard_after_forward=True)
    return len(layers)
