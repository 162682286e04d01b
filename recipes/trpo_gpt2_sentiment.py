"""TRPO on the sentiment task: make a language model write positive movie-review continuations.

    accelerate launch recipes/trpo_gpt2_sentiment.py
    python recipes/trpo_gpt2_sentiment.py --model_name_or_path embedded --reward_model vader --max_steps 20
    accelerate launch recipes/trpo_gpt2_sentiment.py --save_steps 10 --resume_from_checkpoint latest   # continue a stopped run

With a reachable Hugging Face Hub this is the classic TRL task (lvwerra/gpt2-imdb, rewarded by
lvwerra/distilbert-imdb's POSITIVE logit, on IMDB review openings). Without one (found out within
5 s, or HF_HUB_OFFLINE=1) it runs offline on the embedded SmolLM2-135M with the VADER sentiment
score and the prompts in data/. Every TRPOConfig field is a flag (--max_kl, --cg_iters, ...).
Writes metrics.jsonl, training_curves.png, samples.md and the LoRA adapter into --output_dir.
"""

from trpo_rlhf import TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments.recipe import run_recipe


def main(argv: list[str] | None = None) -> None:
    run_recipe(TRPOTrainer, TRPOConfig, default_output_dir="runs/trpo_sentiment", argv=argv)


if __name__ == "__main__":
    main()
