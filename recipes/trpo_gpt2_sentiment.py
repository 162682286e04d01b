"""TRPO on the sentiment task: make a language model write positive movie-review continuations.

    accelerate launch recipes/trpo_gpt2_sentiment.py
    python recipes/trpo_gpt2_sentiment.py --model_name_or_path embedded --reward_model vader --max_steps 20

With a reachable Hugging Face Hub this is the classic TRL task (lvwerra/gpt2-imdb, rewarded by
lvwerra/distilbert-imdb's POSITIVE logit, on IMDB review openings). Without one (found out within
5 s, or HF_HUB_OFFLINE=1) it runs offline on the embedded SmolLM2-135M with the VADER sentiment
score and the prompts in data/. Every TRPOConfig field is a flag (--max_kl, --cg_iters, ...).
Writes metrics.jsonl, training_curves.png, samples.md and the LoRA adapter into --output_dir.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from trpo_rlhf import TRPOConfig, TRPOTrainer
from trpo_rlhf.plotting import plot_training_curves
from trpo_rlhf.sentiment import format_before_after, resolve_sentiment_task, sample_table


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Policy: hub id, local path or 'embedded'. Default: lvwerra/gpt2-imdb, or 'embedded' offline."}
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "Sequence classifier hub id / path, or 'vader'. Default: lvwerra/distilbert-imdb, or 'vader' offline."}
    )
    dataset: str | None = field(
        default=None, metadata={"help": "Prompts: .txt/.json/.csv file or hub dataset id. Default: stanfordnlp/imdb openings, or data/ offline."}
    )
    num_samples_to_show: int = field(default=4, metadata={"help": "Prompts in the before/after table."})


def main(argv: list[str] | None = None) -> None:
    parser = HfArgumentParser((ScriptArguments, TRPOConfig))
    parser.set_defaults(output_dir="runs/trpo_sentiment")
    args, config = parser.parse_args_into_dataclasses(args=argv)

    task = resolve_sentiment_task(args.model_name_or_path, args.reward_model, args.dataset, seed=config.seed)
    trainer = TRPOTrainer(config=config, model=task.model, reward_fn=task.reward_model, train_dataset=task.prompts)
    main_process = trainer.is_main_process
    if main_process:
        print(f"Task: policy={task.model}, reward={task.reward_model}, prompts={task.dataset or 'data/movie_review_openings.txt'} "
              f"({len(task.prompts)}) -- {task.reason}.")

    shown = random.Random(config.seed).sample(task.prompts, min(args.num_samples_to_show, len(task.prompts)))
    before = sample_table(trainer, shown)
    trainer.train()
    after = sample_table(trainer, shown)

    if main_process:
        table = format_before_after(before, after)
        print(table)
        (trainer.output_dir / "samples.md").write_text(table + "\n")
        curves = plot_training_curves(trainer.output_dir / "metrics.jsonl", trainer.output_dir / "training_curves.png",
                                      title=f"TRPO, {task.model}, reward {task.reward_model}")
        print(f"Adapter, metrics and {curves.name} saved in {trainer.output_dir}")


if __name__ == "__main__":
    main()
