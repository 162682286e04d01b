"""TRL's own PPO (trl==1.12.0, `trl.experimental.ppo.PPOTrainer`) on the sentiment task, as the
external reference for our TRPO and PPO: the same prompts, policy, LoRA settings and reward.

    pip install -e .[trl-ppo]
    accelerate launch recipes/trl_ppo_gpt2_sentiment.py --model_name_or_path embedded --reward_model vader

The flags are our PPOConfig's (the same as recipes/ppo_gpt2_sentiment.py), translated to TRL's
settings; TRL keeps its own design where it has one: a full value model (the policy's base with a
scalar head, trained jointly with vf_coef) and its linear learning-rate decay. The text reward
reaches TRL through `trpo_rlhf.trl_adapter.TextRewardModel`. metrics.jsonl uses our key names:
reward/mean, kl/ref, ppo/kl (TRL's approximate KL of the update on the sampled tokens),
ppo/clipfrac, value/loss, policy/entropy, time/step, memory/peak_mb.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, HfArgumentParser, TrainerCallback

from trpo_rlhf import PPOConfig
from trpo_rlhf.models import EMBEDDED, embedded_model_path, ensure_pad_token, load_causal_lm, lora_config_from
from trpo_rlhf.rewards import build_reward_fn
from trpo_rlhf.sentiment import ScriptArguments, resolve_sentiment_task, use_all_cpu_cores
from trpo_rlhf.trainer import METRICS_FILE, peak_memory_mb
from trpo_rlhf.trl_adapter import TextRewardModel, left_pad

# TRL's metric -> our key (see the module docstring)
TRL_TO_OURS = {
    "objective/scores": "reward/mean",
    "objective/kl": "kl/ref",
    "policy/approxkl_avg": "ppo/kl",
    "policy/clipfrac_avg": "ppo/clipfrac",
    "loss/value_avg": "value/loss",
    "policy/entropy_avg": "policy/entropy",
    "loss/policy_avg": "ppo/policy_loss",
}


class MetricsJsonl(TrainerCallback):
    """Append one line per TRL PPO update to metrics.jsonl, under our key names."""

    def __init__(self, path: Path, device: torch.device):
        self.path, self.device = path, device
        self.step, self.last = 0, time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "objective/scores" not in logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        self.step += 1
        row = {"step": self.step, **{ours: logs[trl] for trl, ours in TRL_TO_OURS.items() if trl in logs},
               "time/step": now - self.last, "memory/peak_mb": peak_memory_mb(self.device)}
        self.last = now
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def build_trl_trainer(args: ScriptArguments, config: PPOConfig, task):
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    from trl.experimental.ppo import PPOTrainer as TRLPPOTrainer

    policy, tokenizer = load_causal_lm(task.model)
    ensure_pad_token(tokenizer, policy)
    value_path = embedded_model_path() if task.model == EMBEDDED else task.model
    value_model = AutoModelForSequenceClassification.from_pretrained(value_path, num_labels=1, dtype=torch.float32)
    value_model.config.pad_token_id = tokenizer.pad_token_id

    # Every query left-padded to one length: TextRewardModel splits prompt and response there.
    prompt_ids = tokenizer(task.prompts)["input_ids"]
    prompt_length = max(len(ids) for ids in prompt_ids)
    dataset = Dataset.from_dict({"input_ids": left_pad(prompt_ids, tokenizer.pad_token_id, prompt_length)})
    reward_model = TextRewardModel(build_reward_fn(task.reward_model), tokenizer, prompt_length)

    on_gpu = torch.cuda.is_available()
    trl_config = TRLPPOConfig(
        output_dir=config.output_dir,
        seed=config.seed,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=1,
        local_rollout_forward_batch_size=config.batch_size,
        total_episodes=config.max_steps * config.batch_size,
        response_length=config.max_new_tokens,
        temperature=config.temperature,
        stop_token="eos",
        num_ppo_epochs=config.ppo_epochs,
        num_mini_batches=config.num_minibatches,
        learning_rate=config.learning_rate,
        max_grad_norm=config.max_grad_norm if config.max_grad_norm is not None else 0.0,
        cliprange=config.clip_range,
        cliprange_value=config.value_clip_range if config.value_clip_range is not None else 1e9,
        kl_coef=config.init_kl_coef,
        gamma=config.gamma,
        lam=config.gae_lambda,
        num_sample_generations=0,
        gradient_checkpointing=False,
        bf16=False,
        use_cpu=not on_gpu,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=False,
    )
    trainer = TRLPPOTrainer(
        args=trl_config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,  # with a PEFT policy TRL uses the base with the adapter disabled, as we do
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
        peft_config=lora_config_from(config),
    )
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    trainer.add_callback(MetricsJsonl(Path(config.output_dir) / METRICS_FILE, trainer.accelerator.device))
    return trainer


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((ScriptArguments, PPOConfig))
    parser.set_defaults(output_dir="runs/trl_ppo_sentiment")
    args, config = parser.parse_args_into_dataclasses(args=argv)
    use_all_cpu_cores()
    try:
        import trl.experimental.ppo  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"TRL's PPO is not installed ({exc}); install the extra: pip install -e .[trl-ppo]  (trl==1.12.0)")
    task = resolve_sentiment_task(args.model_name_or_path, args.reward_model, args.dataset, seed=config.seed)
    print(f"Task: policy={task.model}, reward={task.reward_model}, prompts={task.dataset or 'data/movie_review_openings.txt'} "
          f"({len(task.prompts)}) -- {task.reason}.")
    trainer = build_trl_trainer(args, config, task)
    trainer.train()
    trainer.save_model(config.output_dir)
    return trainer


if __name__ == "__main__":
    main()
