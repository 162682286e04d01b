import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordCountReward, WordScoreReward, build_tiny_lm, build_word_tokenizer  # noqa: E402
from trpo_rlhf.trust_region import snapshot  # noqa: E402


@pytest.fixture
def word_tokenizer():
    return build_word_tokenizer()


@pytest.fixture
def tiny_lm(word_tokenizer):
    return build_tiny_lm(word_tokenizer)


@pytest.fixture
def make_trainer(tmp_path, word_tokenizer):
    """A TRPOTrainer on the tiny model with a word-count reward; keyword arguments override config."""
    from trpo_rlhf import TRPOConfig, TRPOTrainer

    def make(model=None, reward_fn=None, train_dataset=None, **overrides):
        settings = dict(
            output_dir=str(tmp_path / "run"),
            max_steps=3,
            batch_size=8,
            max_new_tokens=6,
            seed=0,
            lora_target_modules=["q_proj", "v_proj"],
            value_epochs=1,
            value_minibatch_size=4,
        )
        settings.update(overrides)
        return TRPOTrainer(
            config=TRPOConfig(**settings),
            model=model if model is not None else build_tiny_lm(word_tokenizer),
            tokenizer=word_tokenizer,
            reward_fn=reward_fn or WordScoreReward(),
            train_dataset=train_dataset if train_dataset is not None else TOY_PROMPTS,
        )

    return make


def policy_snapshot(trainer):
    return snapshot(trainer.actor_critic.policy_parameters())


def bitwise_equal(before, after):
    return all(torch.equal(a, b) for a, b in zip(before, after))


def toy_eval_reward(trainer, word="good", repeats=8, seed=99):
    """Mean word count over the toy prompts, sampled with a fixed seed that leaves the training RNG alone."""
    prompts = TOY_PROMPTS * repeats
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return sum(WordCountReward(word)(prompts, trainer.generate(prompts))) / len(prompts)
