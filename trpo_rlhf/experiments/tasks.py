"""The tasks the recipes, the comparison and the benchmark train on, built by one function.

>>> task = build_task("toy", seed=0)
>>> task.name, len(task.prompts) > 0, task.lora_target_modules
('toy', True, ['q_proj', 'v_proj', 'lm_head'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..loading import EMBEDDED, hub_available
from ..prompts import load_prompts
from ..rewards import VADER

TASKS = ("toy", "sentiment", "sentiment_binary", "exact", "exact_lm", "arithmetic")
EXACT_LM_PROMPTS = 16  # review openings, drawn once with a fixed seed (the task is the same for every run seed)
BINARY_THRESHOLD = 0.5


@dataclass
class Task:
    """A policy (hub id, local path, "embedded", or a model), its tokenizer (None: the policy's
    own), the reward (a reward-model id, "vader", a callable, or a list of TRL-style reward
    functions weighted by `reward_weights`), the prompts (strings or chat messages) with the
    dataset's other `columns`, and where they came from. `lora_target_modules` is what the task
    needs (None: the trainer's default)."""

    name: str
    model: Any
    reward_model: Any
    prompts: list
    tokenizer: Any = None
    dataset: str | None = None
    reason: str = ""
    lora_target_modules: list[str] | None = field(default=None)
    columns: dict[str, list] = field(default_factory=dict)
    reward_weights: list[float] | None = None

    def trainer_arguments(self) -> dict[str, Any]:
        """The trainer's model, tokenizer, train_dataset and reward_fn (or reward_funcs) for this task."""
        reward = (
            {"reward_funcs": self.reward_model}
            if isinstance(self.reward_model, list)
            else {"reward_fn": self.reward_model}
        )
        dataset = {"prompt": self.prompts, **self.columns} if self.columns else self.prompts
        return {"model": self.model, "tokenizer": self.tokenizer, "train_dataset": dataset, **reward}

    def describe(self) -> str:
        """One line for a run's log: what is trained on what, and why."""
        prompts = self.dataset or (
            "data/movie_review_openings.txt" if self.name.startswith("sentiment") else f"{self.name} prompts"
        )
        reward = (
            " + ".join(
                f"{w:g} x {f.__name__}"
                for f, w in zip(self.reward_model, self.reward_weights or [1.0] * len(self.reward_model))
            )
            if isinstance(self.reward_model, list)
            else self.reward_model
        )
        text = f"Task: policy={self.model}, reward={reward}, prompts={prompts} ({len(self.prompts)})"
        return f"{text} -- {self.reason}." if self.reason else f"{text}."


class ThresholdReward:
    """1.0 where `reward` scores a completion at least `threshold`, else 0.0.

    >>> ThresholdReward(lambda prompts, completions: [0.2, 0.7], 0.5)(["a", "b"], ["c", "d"])
    [0.0, 1.0]
    """

    def __init__(self, reward, threshold: float):
        self.reward, self.threshold = reward, threshold

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        return [float(score >= self.threshold) for score in self.reward(prompts, completions)]

    def __repr__(self) -> str:
        return f"{type(self.reward).__name__} >= {self.threshold:g}"


def build_task(
    name: str,
    seed: int = 0,
    *,
    model: str | None = None,
    reward_model: str | None = None,
    dataset: str | None = None,
    member: str | None = None,
) -> Task:
    """`toy`: a tiny random Llama with a word-level tokenizer, rewarded for each "good" it writes
    (LoRA must reach its output layer: q_proj, v_proj and lm_head). `sentiment`: the sentiment
    recipes' task, `model`, `reward_model` and `dataset` filling in the hub task or the offline one
    (embedded SmolLM2-135M + VADER + the prompts in data/), see `resolve_sentiment_task`.
    `sentiment_binary`: the same policy and prompts with a binary, sparse reward, 1 when VADER's
    compound score is at least 0.5 and 0 otherwise (a pass/fail judge rather than a graded one).
    `exact`: a tiny Llama pretrained on a word grammar whose completions can all be enumerated
    (`experiments.exact`), with `reward_model` "dense" (the default) or "sparse"; `member` picks
    the grammar, width and completion length of the family (`exact.member`; default the original
    task). `exact_lm`: the embedded SmolLM2-135M-Instruct writes one token after each of 16 review
    openings, so its completions (the whole 49,152-token vocabulary) are enumerated as the exact
    task's are; `reward_model` "dense" scores the token's VADER sentiment in [-1, 1] (3,527 tokens
    score non-zero), "sparse" 1 where that is at least 0.5 (343 tokens). `arithmetic`:
    chat prompts "What is a + b?" with an answer column (`dataset`: a JSON-lines file of them;
    default `data/arithmetic_chat.jsonl`) for `model` (default: the embedded SmolLM2-135M-Instruct),
    scored by TRL-style reward functions (`experiments.arithmetic`)."""
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
        return resolve_sentiment_task(model, reward_model, dataset, seed=seed)
    if name == "sentiment_binary":
        from ..rewards import VaderReward

        if reward_model not in (None, VADER):
            raise ValueError(
                f"sentiment_binary thresholds VADER's score; reward_model={reward_model!r} is not 'vader'."
            )
        task = resolve_sentiment_task(model, VADER, dataset, seed=seed)
        task.name, task.reward_model = name, ThresholdReward(VaderReward(), BINARY_THRESHOLD)
        return task
    if name == "exact":
        from .exact import EXACT_REWARDS, exact_prompts, exact_reward, load_reference
        from .exact import member as exact_member

        if (model, dataset) != (None, None) or reward_model not in (None, *EXACT_REWARDS):
            raise ValueError(
                f"build_task('exact') takes reward_model one of {EXACT_REWARDS} (default 'dense'), and no model or dataset."
            )
        reward = reward_model or "dense"
        grammar = exact_member(member)
        reference, tokenizer = load_reference(grammar)
        prompts = exact_prompts(grammar=grammar)
        return Task(
            "exact",
            reference,
            exact_reward(reward, grammar),
            prompts,
            tokenizer=tokenizer,
            dataset=f"{len(prompts)} prompts of the exact task's grammar {grammar.spec}",
            reason=f"{reward} reward, completions of at most {grammar.length} tokens, evaluated exactly",
            lora_target_modules=["q_proj", "v_proj", "lm_head"],
        )
    if name == "exact_lm":
        import random

        from ..loading import load_causal_lm
        from ..prompts import default_prompts
        from .exact import EXACT_REWARDS

        if (model, dataset, member) != (None, None, None) or reward_model not in (None, *EXACT_REWARDS):
            raise ValueError(
                f"build_task('exact_lm') takes reward_model one of {EXACT_REWARDS} (default 'dense'), and no model, "
                "dataset or member: its policy is the embedded SmolLM2-135M-Instruct."
            )
        reward = reward_model or "dense"
        lm, tokenizer = load_causal_lm(EMBEDDED)
        prompts = random.Random(0).sample(default_prompts(), EXACT_LM_PROMPTS)
        return Task(
            "exact_lm",
            lm.eval(),
            exact_lm_reward(reward),
            prompts,
            tokenizer=tokenizer,
            dataset=f"{len(prompts)} review openings of data/movie_review_openings.txt",
            reason=f"{reward} sentiment reward of a one-token completion, every one of the vocabulary's evaluated exactly",
        )
    if member is not None:
        raise ValueError(f"build_task({name!r}) takes no member: only the exact task has a family (member={member!r}).")
    if name == "arithmetic":
        from .arithmetic import ARITHMETIC_FILE, REWARD_WEIGHTS, correct_answer, load_arithmetic, number_only

        if reward_model is not None:
            raise ValueError(
                f"build_task('arithmetic') scores with its own reward functions (correct_answer, number_only); "
                f"reward_model={reward_model!r} is not one of them. Leave it unset."
            )
        columns = load_arithmetic(dataset)
        prompts = columns.pop("prompt")
        return Task(
            "arithmetic",
            model or EMBEDDED,
            [correct_answer, number_only],
            prompts,
            dataset=dataset or f"data/{ARITHMETIC_FILE}",
            reason="chat prompts; the reward functions check each completion against the answer column",
            columns=columns,
            reward_weights=list(REWARD_WEIGHTS),
        )
    raise ValueError(f"task {name!r} is not one of {TASKS}.")


def exact_lm_reward(name: str):
    """The exact_lm task's reward: "dense", a completion's VADER sentiment in [-1, 1]; "sparse",
    1 where that is at least `BINARY_THRESHOLD`.

    >>> exact_lm_reward("sparse")(["x", "x"], [" wonderful", " table"])
    [1.0, 0.0]
    """
    from ..rewards import VaderReward

    return VaderReward() if name == "dense" else ThresholdReward(VaderReward(), BINARY_THRESHOLD)


def task_for_model(model: str, seed: int = 0, dtype=None) -> Task:
    """The task for a `--model` flag that names a policy: "tiny" is the toy task;
    "random:<shape>" (`experiments.random_models`: 135m, 1.7b, 8b or a config.json) a randomly
    initialised model of that shape in `dtype` on the sentiment prompts and reward, LoRA on its
    attention projections (for cost, not learning); anything else (a hub id, a local path,
    "embedded") the sentiment task on that policy."""
    if model == "tiny":
        return build_task("toy", seed)
    if model.startswith("random:"):
        import torch

        from .random_models import ATTENTION_PROJECTIONS, build_random_lm

        lm, tokenizer = build_random_lm(model.removeprefix("random:"), dtype or torch.float32, seed)
        return Task(
            "random",
            lm,
            VADER,
            load_prompts(None, seed=seed),
            tokenizer=tokenizer,
            reason=f"{model}: random weights, for cost measurements only",
            lora_target_modules=list(ATTENTION_PROJECTIONS),
        )
    return build_task("sentiment", seed, model=model)


HUB_TASK = {"model": "lvwerra/gpt2-imdb", "reward_model": "lvwerra/distilbert-imdb", "dataset": "stanfordnlp/imdb"}
OFFLINE_TASK = {"model": EMBEDDED, "reward_model": VADER, "dataset": None}


def resolve_sentiment_task(
    model: str | None, reward_model: str | None, dataset: str | None, seed: int = 0, hub_timeout: float = 5.0
) -> Task:
    """Fill the unset parts from the hub task when the hub answers within `hub_timeout` seconds,
    else from the offline task; `reason` says which and why."""
    if model is not None and reward_model is not None and dataset is not None:
        reason = "all of model, reward model and dataset were given"
        chosen = {}
    else:
        online, why = hub_available(hub_timeout)
        chosen = HUB_TASK if online else OFFLINE_TASK
        label = (
            "the classic TRL IMDB task"
            if online
            else "the offline default (embedded SmolLM2-135M + VADER + data/ prompts)"
        )
        reason = f"{label}, because {why}"
    model = model if model is not None else chosen["model"]
    reward_model = reward_model if reward_model is not None else chosen["reward_model"]
    dataset = dataset if dataset is not None else chosen.get("dataset")
    return Task("sentiment", model, reward_model, load_prompts(dataset, seed=seed), dataset=dataset, reason=reason)
