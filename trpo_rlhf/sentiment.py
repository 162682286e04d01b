"""The sentiment task shared by the recipes: choose model, reward and prompts, and show samples.

With a reachable hub it is the classic TRL task (lvwerra/gpt2-imdb policy, lvwerra/distilbert-imdb
POSITIVE logit as reward, IMDB review openings); without one, the embedded SmolLM2-135M with the
VADER compound score and the prompts shipped in `data/`.

    >>> task = resolve_sentiment_task("embedded", "vader", None)
    >>> task.model, task.reward_model, len(task.prompts) >= 300
    ('embedded', 'vader', True)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import EMBEDDED, hub_available
from .prompts import load_prompts
from .rewards import VADER

HUB_TASK = {"model": "lvwerra/gpt2-imdb", "reward_model": "lvwerra/distilbert-imdb", "dataset": "stanfordnlp/imdb"}
OFFLINE_TASK = {"model": EMBEDDED, "reward_model": VADER, "dataset": None}


@dataclass
class SentimentTask:
    model: str
    reward_model: str
    dataset: str | None
    prompts: list[str]
    reason: str


def resolve_sentiment_task(
    model: str | None, reward_model: str | None, dataset: str | None, seed: int = 0, hub_timeout: float = 5.0
) -> SentimentTask:
    """Fill the unset parts from the hub task when the hub answers within `hub_timeout` seconds,
    else from the offline task; `reason` says which and why."""
    if model is not None and reward_model is not None and dataset is not None:
        reason = "all of model, reward model and dataset were given"
        chosen = {}
    else:
        online, why = hub_available(hub_timeout)
        chosen = HUB_TASK if online else OFFLINE_TASK
        label = "the classic TRL IMDB task" if online else "the offline default (embedded SmolLM2-135M + VADER + data/ prompts)"
        reason = f"{label}, because {why}"
    model = model if model is not None else chosen["model"]
    reward_model = reward_model if reward_model is not None else chosen["reward_model"]
    dataset = dataset if dataset is not None else chosen.get("dataset")
    return SentimentTask(model, reward_model, dataset, load_prompts(dataset, seed=seed), reason)


def sample_table(trainer, prompts: list[str], seed: int = 1234) -> list[tuple[str, str, float]]:
    """(prompt, completion, reward) for each prompt, sampled with a fixed seed that leaves the
    training RNG untouched, so tables before and after training are comparable."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        completions = trainer.generate(prompts)
    rewards = trainer.reward_fn(prompts, completions)
    return [(p, c, float(r)) for p, c, r in zip(prompts, completions, rewards)]


def format_before_after(before: list[tuple[str, str, float]], after: list[tuple[str, str, float]]) -> str:
    """A markdown table of each prompt's completion and reward before and after training."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ").strip()

    lines = ["| prompt | before | reward | after | reward |", "|---|---|---:|---|---:|"]
    for (prompt, c0, r0), (_, c1, r1) in zip(before, after):
        lines.append(f"| {cell(prompt)} | {cell(c0)} | {r0:.3f} | {cell(c1)} | {r1:.3f} |")
    mean0 = sum(r for *_, r in before) / max(len(before), 1)
    mean1 = sum(r for *_, r in after) / max(len(after), 1)
    lines.append(f"| **mean** | | {mean0:.3f} | | {mean1:.3f} |")
    return "\n".join(lines)
