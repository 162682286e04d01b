"""Critic-free group advantages (grpo, rloo) and num_generations: the pure function against hand
counts and TRL's formulas, and the trainers without a critic."""

import json

import pytest
import torch
from conftest import bitwise_equal, policy_snapshot

from trpo_rlhf import PPOConfig, TRPOConfig
from trpo_rlhf.advantages import group_advantages, token_rewards


def scores_only(scores, length=2):
    mask = torch.ones(len(scores), length)
    return token_rewards(torch.tensor(scores), torch.zeros(len(scores), length), mask, 0.0), mask


def test_rloo_is_the_score_minus_the_mean_of_the_groups_others():
    rewards, mask = scores_only([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    advantages, returns = group_advantages(rewards, mask, 3, "rloo")
    assert advantages[:, 0].tolist() == [1 - 2.5, 2 - 2.0, 3 - 1.5, 0 - 3.0, 0 - 3.0, 6 - 0.0]
    assert torch.equal(advantages[:, 0], advantages[:, 1])  # every token of a completion
    assert returns[:, 0].tolist() == [1.0, 2.0, 3.0, 0.0, 0.0, 6.0]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_matches_trls_formula(scale):
    scores = torch.tensor([1.0, 0.0, 3.0, 1.0, 2.0, 2.0])
    rewards, mask = scores_only(scores.tolist())
    advantages, _ = group_advantages(rewards, mask, 2, "grpo", scale_rewards=scale)
    grouped = scores.view(-1, 2)
    mean = grouped.mean(1).repeat_interleave(2)
    std = {"group": grouped.std(1).repeat_interleave(2), "batch": scores.std().expand(6), "none": None}[scale]
    # TRL's GRPOTrainer (trl 1.12): (r - group mean) / (std + 1e-4), Bessel-corrected std
    expected = scores - mean if std is None else (scores - mean) / (std + 1e-4)
    assert torch.allclose(advantages[:, 0], expected, atol=1e-6)
    assert advantages[4, 0] == 0 and advantages[5, 0] == 0  # a group of equal scores has no signal


def test_a_token_is_charged_the_kl_from_it_on():
    mask = torch.ones(2, 2)
    token_kl = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0, 0.0]), token_kl, mask, kl_coef=0.5)
    advantages, returns = group_advantages(rewards, mask, 2, "rloo")
    # returns-to-go: row 0 is 1 - 0.5 - 0.5 = 0 at t=0 and 1 - 0.5 at t=1; the baseline is the other row's G_0
    assert returns.tolist() == [[0.0, 0.5], [0.0, 0.0]]
    assert advantages.tolist() == [[0.0, 0.5], [0.0, 0.0]]


def test_positions_after_eos_stay_zero():
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = token_rewards(torch.tensor([2.0, 0.0]), torch.zeros(2, 3), mask, 0.0)
    advantages, _ = group_advantages(rewards, mask, 2, "grpo", scale_rewards="none")
    assert advantages.tolist() == [[1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]]


def test_group_settings_are_checked_at_construction(tmp_path):
    with pytest.raises(ValueError, match="num_generations=3 must be >= 1 and divide batch_size=8"):
        TRPOConfig(output_dir=str(tmp_path), batch_size=8, num_generations=3)
    with pytest.raises(ValueError, match="needs num_generations >= 2"):
        PPOConfig(output_dir=str(tmp_path), advantage_estimator="grpo")
    with pytest.raises(ValueError, match="advantage_estimator='ppo' is not one of"):
        TRPOConfig(output_dir=str(tmp_path), advantage_estimator="ppo")
    with pytest.raises(ValueError, match="scale_rewards='std' is not one of"):
        TRPOConfig(output_dir=str(tmp_path), scale_rewards="std")
    assert TRPOConfig(output_dir=str(tmp_path), scale_rewards=False).scale_rewards == "none"  # TRL's bool


GROUP = dict(num_generations=4, advantage_estimator="grpo", max_steps=2)


def test_each_prompt_is_sampled_num_generations_times_in_a_row(make_trainer):
    trainer = make_trainer(**GROUP)
    batch, _ = trainer.collect_batch()
    prompts = batch.prompts
    assert len(prompts) == 8 and len(set(prompts)) == 2
    assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4
    assert len({tuple(row.tolist()) for row in batch.response_ids[:4]}) > 1  # independent samples


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_a_group_estimator_builds_and_runs_no_critic(make_trainer, estimator, monkeypatch):
    trainer = make_trainer(**{**GROUP, "advantage_estimator": estimator})
    assert not trainer.actor_critic.has_critic and trainer.value_optimizer is None
    assert "value" not in trainer.actor_critic.peft_model.peft_config
    assert trainer.actor_critic.value_parameters() == []

    def no_value_pass(*args, **kwargs):
        raise AssertionError("a critic-free run ran a value pass")

    monkeypatch.setattr(trainer.actor_critic, "values", no_value_pass)
    before = policy_snapshot(trainer)
    history = trainer.train()
    assert not bitwise_equal(before, policy_snapshot(trainer))
    assert all(not key.startswith(("value/", "time/value")) for row in history for key in row)
    assert not (trainer.output_dir / "value").exists()
    saved = json.loads((trainer.output_dir / "trainer_config.json").read_text())
    assert saved["advantage_estimator"] == estimator


@pytest.mark.parametrize("config_class", [TRPOConfig, PPOConfig])
def test_a_critic_free_run_resumes_bitwise(tmp_path, word_tokenizer, config_class):
    from trpo_rlhf import PPOTrainer, TRPOTrainer
    from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordScoreReward, build_tiny_lm

    trainer_class = TRPOTrainer if config_class is TRPOConfig else PPOTrainer

    def make(folder, steps, **extra):
        config = config_class(
            output_dir=str(tmp_path / folder),
            max_steps=steps,
            batch_size=8,
            max_new_tokens=6,
            lora_target_modules=["q_proj", "v_proj"],
            num_generations=4,
            advantage_estimator="rloo",
            **extra,
        )
        return trainer_class(
            config=config,
            model=build_tiny_lm(word_tokenizer),
            tokenizer=word_tokenizer,
            reward_fn=WordScoreReward(),
            train_dataset=TOY_PROMPTS,
        )

    straight = make("straight", 4)
    straight_history = straight.train()
    first = make("resumed", 2, save_steps=2)
    first.train()
    second = make("resumed", 4)
    resumed_history = second.train(resume_from_checkpoint=True)
    drop = lambda row: {k: v for k, v in row.items() if not k.startswith(("time/", "memory/"))}  # noqa: E731
    assert [drop(r) for r in resumed_history] == [drop(r) for r in straight_history[2:]]
    assert bitwise_equal(policy_snapshot(straight), policy_snapshot(second))
