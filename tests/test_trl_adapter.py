"""TRL's PPO as the external reference: the text-reward adapter and the recipe."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trl.experimental.utils import get_reward

from trpo_rlhf.experiments.toy import WordCountReward
from trpo_rlhf.experiments.trl_adapter import TextRewardModel, left_pad

ROOT = Path(__file__).resolve().parents[1]


def test_adapter_returns_the_reward_of_the_decoded_response_text(word_tokenizer):
    """Through TRL's own get_reward, for given ids: exactly reward_fn(prompt text, response text)."""
    seen = []

    def reward_fn(prompts, completions):
        seen.append((list(prompts), list(completions)))
        return [10.0 * WordCountReward("good")([p], [c])[0] + len(p.split()) for p, c in zip(prompts, completions)]

    tok = word_tokenizer
    pad, eos = tok.pad_token_id, tok.eos_token_id
    prompts = [tok("the film was")["input_ids"], tok("I felt")["input_ids"]]
    queries = torch.tensor(left_pad(prompts, pad))  # [[the film was], [PAD I felt]]
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    responses = torch.tensor([ids("good and good") + [eos, pad], ids("sad") + [eos, pad, pad, pad]])
    query_responses = torch.cat([queries, responses], dim=1)
    P = queries.shape[1]

    _, scores, _ = get_reward(TextRewardModel(reward_fn, tok, prompt_length=P), query_responses, pad, P)
    assert seen == [(["the film was", "I felt"], ["good and good", "sad"])]
    expected = torch.tensor(reward_fn(["the film was", "I felt"], ["good and good", "sad"]))
    torch.testing.assert_close(scores, expected)  # [23.0, 2.0]
    assert scores.tolist() == [23.0, 2.0]


def test_adapter_with_pad_equal_to_eos(word_tokenizer):
    """Decoder-only tokenizers often pad with EOS (GPT-2, SmolLM2): get_reward then masks the EOS too."""
    tok = word_tokenizer
    tok.pad_token = tok.eos_token
    eos = tok.eos_token_id
    queries = torch.tensor(left_pad([tok("it was")["input_ids"]], eos, length=4))
    responses = torch.tensor([tok("very good")["input_ids"] + [eos, eos]])
    reward = TextRewardModel(lambda p, c: [float(len(text)) for text in c], tok, prompt_length=4)
    _, scores, _ = get_reward(reward, torch.cat([queries, responses], 1), eos, 4)
    assert scores.tolist() == [float(len("very good"))]


def test_adapter_validates_rewards_and_layout(word_tokenizer):
    from trpo_rlhf import RewardError

    tok = word_tokenizer
    ids = torch.tensor([[3, 8, 19, 27]])
    with pytest.raises(RewardError, match="non-finite"):
        TextRewardModel(lambda p, c: [float("nan")], tok, 2).text_scorer(ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match="left-padded to prompt_length"):
        TextRewardModel(lambda p, c: [0.0], tok, 9).text_scorer(ids, torch.ones_like(ids))
    with pytest.raises(ValueError, match="more than the padded length 1"):
        left_pad([[1, 2]], 0, length=1)


@pytest.mark.slow
def test_trl_recipe_runs_two_steps_on_the_embedded_default(tmp_path):
    out = tmp_path / "trl"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "trl_ppo_gpt2_sentiment.py"),
            "--max_steps",
            "2",
            "--batch_size",
            "2",
            "--max_new_tokens",
            "6",
            "--ppo_epochs",
            "1",
            "--output_dir",
            str(out),
        ],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in (
            "reward/mean",
            "kl/ref",
            "ppo/kl",
            "ppo/clipfrac",
            "value/loss",
            "policy/entropy",
            "time/step",
            "memory/peak_mb",
        ):
            assert key in row, key
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("schedule,expect_constant", [("constant", True), ("linear", False)])
def test_trl_trainer_keeps_our_constant_learning_rate_unless_told(word_tokenizer, tmp_path, schedule, expect_constant):
    # TRL's default linear decay to zero made its PPO a different algorithm on short runs.
    from trpo_rlhf import PPOConfig
    from trpo_rlhf.experiments.toy import TOY_PROMPTS, build_tiny_lm, build_tiny_value_model
    from trpo_rlhf.experiments.trl_adapter import build_trl_ppo_trainer
    from trpo_rlhf.rewards import build_reward_fn

    config = PPOConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        batch_size=2,
        max_new_tokens=4,
        learning_rate=1e-3,
        lora_target_modules=["q_proj", "v_proj"],
    )
    trainer = build_trl_ppo_trainer(
        config,
        build_tiny_lm(word_tokenizer),
        build_tiny_value_model(word_tokenizer),
        word_tokenizer,
        TOY_PROMPTS,
        build_reward_fn(WordCountReward("good")),
        lr_scheduler_type=schedule,
    )
    rates = []
    for _ in range(3):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert rates[0] == pytest.approx(1e-3)
    assert (rates == [rates[0]] * 3) == expect_constant, rates
