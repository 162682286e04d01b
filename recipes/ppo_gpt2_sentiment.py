"""PPO-clip on the sentiment task, on the same engine, task and flags as trpo_gpt2_sentiment.py.

    accelerate launch recipes/ppo_gpt2_sentiment.py
    python recipes/ppo_gpt2_sentiment.py --model_name_or_path embedded --reward_model vader --max_steps 20
    accelerate launch recipes/ppo_gpt2_sentiment.py --save_steps 10 --resume_from_checkpoint latest   # continue a stopped run

Every PPOConfig field is a flag (--learning_rate, --ppo_epochs, --clip_range, ...).
"""

from trpo_rlhf import PPOConfig, PPOTrainer
from trpo_rlhf.experiments.recipe import run_recipe


def main(argv: list[str] | None = None) -> None:
    run_recipe(PPOTrainer, PPOConfig, default_output_dir="runs/ppo_sentiment", argv=argv)


if __name__ == "__main__":
    main()
