"""The tasks the recipes, the comparison and the benchmark train on, built by one function.

>>> task = build_task("toy", seed=0)
>>> task.name, len(task.prompts) > 0, task.lora_target_modules
('toy', True, ['q_proj', 'v_proj', 'lm_head'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TASKS = ("toy", "sentiment")


@dataclass
class Task:
    """A policy (hub id, local path, "embedded", or a model), its tokenizer (None: the policy's
    own), the reward (a reward-model id, "vader", or a callable), the prompts, and where they came
    from. `lora_target_modules` is what the task needs (None: the trainer's default)."""

    name: str
    model: Any
    reward_model: Any
    prompts: list[str]
    tokenizer: Any = None
    dataset: str | None = None
    reason: str = ""
    lora_target_modules: list[str] | None = field(default=None)

    def describe(self) -> str:
        """One line for a run's log: what is trained on what, and why."""
        prompts = self.dataset or (
            "data/movie_review_openings.txt" if self.name == "sentiment" else f"{self.name} prompts"
        )
        text = f"Task: policy={self.model}, reward={self.reward_model}, prompts={prompts} ({len(self.prompts)})"
        return f"{text} -- {self.reason}." if self.reason else f"{text}."


def build_task(
    name: str, seed: int = 0, *, model: str | None = None, reward_model: str | None = None, dataset: str | None = None
) -> Task:
    """`toy`: a tiny random Llama with a word-level tokenizer, rewarded for each "good" it writes
    (LoRA must reach its output layer: q_proj, v_proj and lm_head). `sentiment`: the sentiment
    recipes' task, `model`, `reward_model` and `dataset` filling in the hub task or the offline one
    (embedded SmolLM2-135M + VADER + the prompts in data/), see `resolve_sentiment_task`."""
    if name == "toy":
        if (model, reward_model, dataset) != (None, None, None):
            raise ValueError("build_task('toy') takes no model, reward_model or dataset: the toy task is fixed.")
        from .toy import TOY_PROMPTS, WordCountReward, build_tiny_lm, build_word_tokenizer

        tokenizer = build_word_tokenizer()
        return Task(
            "toy",
            build_tiny_lm(tokenizer, seed=seed),
            WordCountReward("good"),
            list(TOY_PROMPTS),
            tokenizer=tokenizer,
            lora_target_modules=["q_proj", "v_proj", "lm_head"],
        )
    if name == "sentiment":
        from .sentiment import resolve_sentiment_task

        return resolve_sentiment_task(model, reward_model, dataset, seed=seed)
    raise ValueError(f"task {name!r} is not one of {TASKS}.")


def task_for_model(model: str, seed: int = 0) -> Task:
    """The task for a `--model` flag that names a policy: "tiny" is the toy task, anything else
    (a hub id, a local path, "embedded") the sentiment task on that policy."""
    return build_task("toy", seed) if model == "tiny" else build_task("sentiment", seed, model=model)
