"""The body every training recipe shares: choose the task (model, reward, prompts), train with a
progress bar, show completions before and after, plot the curves.

`sentiment` (recipes/{trpo,ppo}_gpt2_sentiment.py): with a reachable hub the classic TRL task
(lvwerra/gpt2-imdb policy, lvwerra/distilbert-imdb POSITIVE logit as reward, IMDB review
openings); without one, the embedded SmolLM2-135M with the VADER compound score and the prompts
shipped in `data/`. `arithmetic` (recipes/trpo_smollm2_arithmetic.py): chat prompts with an
answer column and TRL-style reward functions (`experiments.arithmetic`).

    >>> task = build_task("sentiment", model="embedded", reward_model="vader", dataset=None)
    >>> task.model, task.reward_model, len(task.prompts) >= 300
    ('embedded', 'vader', True)
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field

import torch

from ..checkpointing import TrainingInterrupted
from ..tracking import markdown_cell
from .cli import CONFIG_HELP, apply_config_file
from .tasks import build_task


def sample_table(trainer, rows: list[int], seed: int = 1234) -> list[tuple[str, str, float]]:
    """(prompt, completion, reward) for each of the dataset's `rows`, sampled with a fixed seed that
    leaves the training RNG untouched, so tables before and after training are comparable."""
    prompts = [trainer.prompts[i] for i in rows]
    # Every device's generator is forked (sampling on a GPU draws from the CUDA one), so showing
    # samples changes nothing in training, and a resumed run stays exact.
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        completions = trainer.generate(prompts)
    rewards, _ = trainer.score(rows, completions)
    if trainer.prompt_messages is not None:  # a chat prompt is shown by its last message, not its template
        prompts = [trainer.prompt_messages[i][-1]["content"] for i in rows]
    return [(p, c, float(r)) for p, c, r in zip(prompts, completions, rewards.tolist())]


def format_before_after(before: list[tuple[str, str, float]], after: list[tuple[str, str, float]]) -> str:
    """A markdown table of each prompt's completion and reward before and after training."""

    lines = ["| prompt | before | reward | after | reward |", "|---|---|---:|---|---:|"]
    for (prompt, c0, r0), (_, c1, r1) in zip(before, after):
        lines.append(f"| {markdown_cell(prompt)} | {markdown_cell(c0)} | {r0:.3f} | {markdown_cell(c1)} | {r1:.3f} |")
    mean0 = sum(r for *_, r in before) / max(len(before), 1)
    mean1 = sum(r for *_, r in after) / max(len(after), 1)
    lines.append(f"| **mean** | | {mean0:.3f} | | {mean1:.3f} |")
    return "\n".join(lines)


def use_all_cpu_cores(runs_at_once: int = 1) -> int:
    """Give a lone CPU process every core, or its share of them when `runs_at_once` such
    processes run side by side (each taking every core oversubscribes them). `accelerate launch`
    without a config sets OMP_NUM_THREADS=1 on a machine without a GPU, which halves a 2-core step;
    a single process has nothing to share the cores with. Returns the thread count in use."""
    alone = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if alone and not torch.cuda.is_available() and (runs_at_once > 1 or torch.get_num_threads() == 1):
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // runs_at_once))
    return torch.get_num_threads()


@dataclass
class ScriptArguments:
    """The recipe flags beside the trainer's config fields."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Policy: hub id, local path or 'embedded'. Default: lvwerra/gpt2-imdb, or 'embedded' offline."
        },
    )
    reward_model: str | None = field(
        default=None,
        metadata={
            "help": "Sequence classifier hub id / path, or 'vader'. Default: lvwerra/distilbert-imdb, or 'vader' offline."
        },
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Prompts: .txt/.json/.csv file or hub dataset id. Default: stanfordnlp/imdb openings, or data/ offline."
        },
    )
    config: str | None = field(default=None, metadata={"help": CONFIG_HELP})
    num_samples_to_show: int = field(default=4, metadata={"help": "Prompts in the before/after table."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Continue an interrupted run: 'latest' (the newest checkpoint-<step> in --output_dir) or a "
            "checkpoint folder. The run continues exactly as if it had not stopped."
        },
    )


def parse_resume(value: str | None) -> bool | str | None:
    """--resume_from_checkpoint's value as `train(resume_from_checkpoint=...)` takes it."""
    if value is None or value.lower() in {"", "false", "no", "none"}:
        return None
    return True if value.lower() in {"latest", "true", "yes"} else value


def run_recipe(
    trainer_class,
    config_class,
    default_output_dir: str,
    task: str = "sentiment",
    argv: list[str] | None = None,
    defaults: dict | None = None,
):
    """Parse `ScriptArguments` + `config_class` flags (`defaults` overriding the config's own),
    train `trainer_class` on `task` ("sentiment" or "arithmetic"), and write metrics.jsonl,
    training_curves.png, samples.md and the adapter to --output_dir."""
    import dataclasses

    from transformers import HfArgumentParser

    from .plotting import plot_training_curves

    parser = HfArgumentParser((ScriptArguments, config_class))
    parser.set_defaults(output_dir=default_output_dir, **(defaults or {}))
    args, config = parser.parse_args_into_dataclasses(args=apply_config_file(parser, argv))
    use_all_cpu_cores()

    chosen = build_task(
        task, config.seed, model=args.model_name_or_path, reward_model=args.reward_model, dataset=args.dataset
    )
    if config.reward_weights is None and chosen.reward_weights is not None:
        config = dataclasses.replace(config, reward_weights=chosen.reward_weights)
    trainer = trainer_class(config=config, **chosen.trainer_arguments())
    resume = parse_resume(args.resume_from_checkpoint)
    checkpoint = trainer.resolve_checkpoint(resume)  # fails before any compute
    if trainer.is_main_process:
        print(chosen.describe() + (f" Resuming from {checkpoint}." if checkpoint else ""))

    rows = len(trainer.prompts)
    shown = random.Random(config.seed).sample(range(rows), min(args.num_samples_to_show, rows))
    before = sample_table(trainer, shown)
    try:
        # (None for a resume of a run killed before its first checkpoint: it starts again from step 0)
        trainer.train(resume_from_checkpoint=checkpoint if checkpoint is not None else resume)
    except TrainingInterrupted as stop:
        trainer.accelerator.end_training()
        print(f"{stop}. Continue with --resume_from_checkpoint {stop.checkpoint}", file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    after = sample_table(trainer, shown)

    if trainer.is_main_process:
        table = format_before_after(before, after)
        print(table)
        trainer.run_directory.record("samples.md", "training_curves.png")  # the run's own files, as its marker says
        (trainer.output_dir / "samples.md").write_text(table + "\n")
        curves = plot_training_curves(
            trainer.output_dir / "metrics.jsonl",
            trainer.output_dir / "training_curves.png",
            title=f"{trainer.progress_name}, {chosen.model}, the {chosen.name} task",
        )
        print(f"Adapter, metrics and {curves.name} saved in {trainer.output_dir}")
    trainer.accelerator.end_training()  # tears down the process group of a multi-process launch
    return trainer
