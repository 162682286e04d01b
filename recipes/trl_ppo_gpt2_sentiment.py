"""TRL's own PPO (trl==1.12.0, `trl.experimental.ppo.PPOTrainer`) on the sentiment task, as the
external reference for our TRPO and PPO: the same prompts, policy, LoRA settings and reward.

    pip install -e .[trl-ppo]
    accelerate launch recipes/trl_ppo_gpt2_sentiment.py --model_name_or_path embedded --reward_model vader

The flags are our PPOConfig's (the same as recipes/ppo_gpt2_sentiment.py), translated to TRL's
settings by `trpo_rlhf.experiments.trl_adapter.build_trl_ppo_trainer`. The value model is the policy's base
with a scalar head, as TRL expects. metrics.jsonl uses our key names: reward/mean, kl/ref, ppo/kl
(TRL's approximate KL of the update on the sampled tokens), ppo/clipfrac, value/loss,
policy/entropy, time/step, memory/peak_mb.
"""

from __future__ import annotations

from transformers import HfArgumentParser

from trpo_rlhf import PPOConfig
from trpo_rlhf.experiments.cli import apply_config_file
from trpo_rlhf.experiments.recipe import ScriptArguments, parse_resume, use_all_cpu_cores
from trpo_rlhf.experiments.tasks import resolve_sentiment_task
from trpo_rlhf.rewards import build_reward_fn


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((ScriptArguments, PPOConfig))
    parser.set_defaults(output_dir="runs/trl_ppo_sentiment")
    args, config = parser.parse_args_into_dataclasses(args=apply_config_file(parser, argv))
    use_all_cpu_cores()
    if parse_resume(args.resume_from_checkpoint) is not None:
        raise SystemExit(
            "--resume_from_checkpoint: TRL 1.12's PPOTrainer cannot resume (its train() takes no checkpoint and "
            "its checkpoints hold no rollout state); start a new run, or use recipes/ppo_gpt2_sentiment.py, "
            "whose PPO resumes exactly."
        )
    try:
        import trl.experimental.ppo  # noqa: F401

        from trpo_rlhf.experiments.trl_adapter import build_trl_ppo_trainer, load_policy_and_value_model
    except ImportError as exc:
        raise SystemExit(
            f"TRL's PPO is not installed ({exc}); install the extra: pip install -e .[trl-ppo]  (trl==1.12.0)"
        ) from None
    task = resolve_sentiment_task(args.model_name_or_path, args.reward_model, args.dataset, seed=config.seed)
    print(task.describe())
    policy, value_model, tokenizer = load_policy_and_value_model(task.model)
    trainer = build_trl_ppo_trainer(
        config, policy, value_model, tokenizer, task.prompts, build_reward_fn(task.reward_model)
    )
    trainer.train()
    trainer.save_model(config.output_dir)
    return trainer


if __name__ == "__main__":
    main()
