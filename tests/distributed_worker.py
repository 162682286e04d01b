"""Run by test_distributed.py under `torchrun --nproc_per_node 2` or `accelerate launch`: two TRPO
(or, given `ppo`, PPO; given `trpo_top_critic`, TRPO with the critic on the top layer and the
forward-mode quadratic; given `trpo_checkpointed`, TRPO with `gradient_checkpointing`) steps on
the tiny model, with `policy/kl_held_out` on 2 prompts per rank, then every rank reports a digest
of its policy and critic tensors, how much of the frozen base it holds and how many of its decoder
layers recompute their activations."""

import hashlib
import json
import os
import sys

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from trpo_rlhf import PPOConfig, PPOTrainer, TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordScoreReward, build_tiny_lm, build_word_tokenizer


def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main(output_dir: str, algorithm: str = "trpo") -> None:
    tokenizer = build_word_tokenizer()
    config_class, trainer_class = (PPOConfig, PPOTrainer) if algorithm == "ppo" else (TRPOConfig, TRPOTrainer)
    variant = {
        # A sharded base runs the one-iteration step (no Fisher-vector product).
        "trpo_cg1": {"cg_iters": 1},
        "trpo_checkpointed": {"gradient_checkpointing": True, "cg_iters": 1},
    }.get(algorithm, {})
    config = config_class(
        **variant,
        output_dir=output_dir,
        max_steps=2,
        batch_size=4,
        max_new_tokens=6,
        seed=0,
        lora_target_modules=["q_proj", "v_proj", "lm_head"],
        value_epochs=1,
        value_minibatch_size=2,
        held_out_kl_prompts=2,
    )
    trainer = trainer_class(
        config=config,
        model=build_tiny_lm(tokenizer),
        tokenizer=tokenizer,
        reward_fn=WordScoreReward(),
        train_dataset=TOY_PROMPTS,
    )
    first_prompts = trainer._next_prompts()
    first_held_out = trainer._held_out_prompts()
    trainer._prompt_order = [trainer.prompts.index(p) for p in first_prompts] + trainer._prompt_order  # put them back
    history = trainer.train()
    trainable = {id(t) for t in trainer.actor_critic.trainable_tensors().values()}
    frozen = [p for p in trainer.actor_critic.peft_model.parameters() if id(p) not in trainable]
    report = {
        "sharded_layers": sum(isinstance(m, FSDPModule) for m in trainer.actor_critic.peft_model.modules()),
        # FSDP2 renames the layers' classes, so they are counted by the forward checkpointing gives them.
        "checkpointed_layers": sum("forward" in vars(m) for m in trainer.actor_critic.peft_model.modules()),
        "frozen_numel": sum(p.numel() for p in frozen),
        "frozen_local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in frozen),
        "rank": trainer.accelerator.process_index,
        "world": trainer.accelerator.num_processes,
        "policy": digest(trainer.actor_critic.policy_parameters()),
        "value": digest(trainer.actor_critic.value_parameters()),
        "prompts": first_prompts,
        "held_out_prompts": first_held_out,
        "accepted": [h.get("trpo/accepted", 1.0) for h in history],
    }
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if trainer.is_main_process:
        with open(f"{output_dir}/ranks.json", "w") as f:
            json.dump(reports, f)
    # Without this, a rank's gloo threads can outlive the interpreter ("terminate called without an
    # active exception", exit -6) now and then; the barrier makes both ranks tear down together,
    # after the other has finished writing (it still happened once under FSDP without it).
    dist.barrier()
    trainer.accelerator.end_training()
    # Even so it happened again (once in a CI run after both steps and the report were done): the
    # crash is in the interpreter's teardown of gloo's C++ threads, after everything this worker
    # checks has been written, so the worker leaves without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
