"""The frozen base sharded across processes with FSDP2 (PyTorch's `fully_shard`; Zhao et al. 2023,
"PyTorch FSDP"), for `accelerate launch --config_file recipes/accelerate_configs/fsdp.yaml`.

Each decoder layer's frozen weights are split across the processes and gathered for that layer's
forward (and backward) only, so a process holds about 1/N of the layers at rest. The tensors the
update moves (both LoRA adapters and the value head) stay whole on every process: the trainer
averages their gradients, Fisher quadratics and line-search measurements itself, as with
replicated models. So do the embeddings, the final norm and the LM head, which the critic's
backbone pass and tied embeddings share between modules.

A DeepSpeed ZeRO-3 launch (`deepspeed_zero3.yaml`) asks for the same partitioning of the frozen
parameters, and gets it from the same code; ZeRO-1 and ZeRO-2 partition only optimizer states and
gradients, which here are the LoRA tensors' (megabytes), so their processes stay whole replicas.
The trainer never wraps a model in a DeepSpeed engine.

    >>> fsdp_requested("MULTI_CPU", {"ACCELERATE_USE_FSDP": "true"})
    True
    >>> deepspeed_zero_stage("MULTI_CPU", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"})
    3
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from accelerate.utils import DistributedType


def fsdp_requested(distributed_type: DistributedType | str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the processes were launched to shard with FSDP: accelerate reports FSDP on GPUs; on
    CPU processes (gloo) it reports MULTI_CPU, and only the launcher's environment says FSDP."""
    kind = DistributedType(distributed_type)
    if kind == DistributedType.FSDP:
        return True
    return kind == DistributedType.MULTI_CPU and environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_zero_stage(
    distributed_type: DistributedType | str, environ: Mapping[str, str] = os.environ
) -> int | None:
    """The ZeRO stage a DeepSpeed launch asks for, or None when the processes were not launched with
    DeepSpeed (accelerate reports DEEPSPEED on GPUs; CPU processes report MULTI_CPU, and only the
    launcher's environment says DeepSpeed). The stage comes from the accelerate config's
    `deepspeed_config` or from its `deepspeed_config_file`.

    Raises ValueError for what the trainer would not carry out: offloading to CPU or NVMe, and
    `zero3_init_flag` (DeepSpeed partitioning the weights while transformers loads them).
    """
    kind = DistributedType(distributed_type)
    if kind != DistributedType.DEEPSPEED and environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    config_file = environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if config_file:
        zero = json.loads(Path(config_file).read_text()).get("zero_optimization", {})
        stage = zero.get("stage", 0)
        offload = {key: zero.get(key, {}).get("device", "none") for key in ("offload_optimizer", "offload_param")}
        source = f"zero_optimization in {config_file}"
    else:
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        offload = {
            f"{key}_device": environ.get(f"ACCELERATE_DEEPSPEED_{key.upper()}_DEVICE", "none")
            for key in ("offload_optimizer", "offload_param")
        }
        source = "the accelerate config's deepspeed_config"
    if str(stage) not in ("0", "1", "2", "3"):
        raise ValueError(
            f"DeepSpeed zero_stage={stage!r} ({source}): set 0, 1, 2 (replicas) or 3 (the frozen base partitioned)."
        )
    for key, device in offload.items():
        if str(device).lower() not in ("none", "null"):
            raise ValueError(
                f"DeepSpeed {key}={device!r} ({source}): this trainer does not offload. Set it to none; to fit a large "
                "base, partition it across the GPUs (recipes/accelerate_configs/deepspeed_zero3.yaml) and load it in "
                "bfloat16 (--model_dtype bfloat16)."
            )
    if environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true":
        raise ValueError(
            "DeepSpeed zero3_init_flag=true: the trainer loads the model whole and then partitions its frozen layers "
            "itself, which weights that DeepSpeed partitioned while loading cannot take. Set zero3_init_flag: false "
            "(as recipes/accelerate_configs/deepspeed_zero3.yaml does)."
        )
    return int(stage)


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
