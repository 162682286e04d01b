"""TRL-style reward functions (`reward_funcs`, `reward_weights`, the dataset's other columns) and
conversational prompts (chat messages through the tokenizer's chat template)."""

import math

import pytest
import torch
from conftest import policy_snapshot

from trpo_rlhf import TRPOConfig, TRPOTrainer
from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordScoreReward, build_tiny_lm
from trpo_rlhf.rewards import RewardError, RewardFunctions

SETTINGS = dict(max_steps=1, batch_size=8, max_new_tokens=5, lora_target_modules=["q_proj", "v_proj"], value_epochs=1)


def make(tmp_path, tokenizer, train_dataset, reward_funcs=None, reward_fn=None, model=None, **overrides):
    config = TRPOConfig(output_dir=str(tmp_path / "run"), **{**SETTINGS, **overrides})
    return TRPOTrainer(
        config=config,
        model=model if model is not None else build_tiny_lm(tokenizer),
        tokenizer=tokenizer,
        train_dataset=train_dataset,
        reward_funcs=reward_funcs,
        reward_fn=reward_fn,
    )


def test_columns_reach_the_functions_and_each_is_logged_on_its_own(tmp_path, word_tokenizer):
    answers = [f"answer-{i}" for i in range(len(TOY_PROMPTS))]
    seen = []

    def matches_answer(prompts, completions, answer, completion_ids, trainer_state, **kwargs):
        seen.append((list(prompts), list(answer), trainer_state.global_step, completion_ids))
        return [float(len(c.split())) for c in completions]

    def constant(completions, **kwargs):
        return [2.0] * len(completions)

    trainer = make(
        tmp_path,
        word_tokenizer,
        {"prompt": TOY_PROMPTS, "answer": answers},
        reward_funcs=[matches_answer, constant],
        reward_weights=[1.0, 0.5],
    )
    (stats,) = trainer.train()
    ((prompts, answer, step, completion_ids),) = seen
    assert step == 0 and all(answers[TOY_PROMPTS.index(p)] == a for p, a in zip(prompts, answer))
    assert [len(ids) for ids in completion_ids] == [len(c) for c in completion_ids] and len(completion_ids) == 8
    assert stats["reward/constant"] == 2.0
    assert math.isclose(stats["reward/mean"], stats["reward/matches_answer"] + 0.5 * 2.0, rel_tol=1e-6)


def test_a_none_score_is_left_out_of_the_sum_and_a_completion_no_function_scores_is_an_error(word_tokenizer):
    from trpo_rlhf.rewards import RewardInputs

    inputs = RewardInputs(["a", "b"], ["x", "y"], ["a", "b"], ["x", "y"], [[1], [2]])
    half = RewardFunctions([lambda completions, **k: [1.0, None], lambda completions, **k: [3.0, 4.0]])
    scores, each = half(inputs, 0)
    assert scores.tolist() == [4.0, 4.0] and math.isnan(each["<lambda>"][1])
    never = RewardFunctions([lambda completions, **k: [1.0, None]])
    with pytest.raises(RewardError, match="No reward function scored completion 1"):
        never(inputs, 0)


def test_a_bad_return_names_the_function(tmp_path, word_tokenizer):
    def brevity(completions, **kwargs):
        return "short"

    trainer = make(tmp_path, word_tokenizer, TOY_PROMPTS, reward_funcs=[brevity, "vader"])
    with pytest.raises(RewardError, match="The reward function 'brevity' returned str on batch 0"):
        trainer.train()


def test_reward_arguments_are_checked_at_construction(tmp_path, word_tokenizer):
    reward = WordScoreReward()
    with pytest.raises(ValueError, match="Both reward_fn and reward_funcs were given"):
        make(tmp_path, word_tokenizer, TOY_PROMPTS, reward_funcs=[reward], reward_fn=reward)
    with pytest.raises(ValueError, match="reward_weights has 2 weights for 1 reward functions"):
        make(tmp_path, word_tokenizer, TOY_PROMPTS, reward_funcs=reward, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="weighs the functions of reward_funcs, but none were given"):
        make(tmp_path, word_tokenizer, TOY_PROMPTS, reward_fn=reward, reward_weights=[1.0])
    with pytest.raises(TypeError, match="reward_funcs\\[0\\] is a LlamaForCausalLM model: pass its hub id"):
        make(tmp_path, word_tokenizer, TOY_PROMPTS, reward_funcs=[build_tiny_lm(word_tokenizer)])


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The embedded SmolLM2-135M-Instruct's tokenizer, which has a chat template."""
    from transformers import AutoTokenizer

    from trpo_rlhf.loading import embedded_model_path

    return AutoTokenizer.from_pretrained(embedded_model_path())


CHATS = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]] + [
    [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 7 + 1?"}]
]


def test_a_conversational_dataset_is_templated_exactly_and_its_completions_reach_rewards_as_messages(
    tmp_path, chat_tokenizer
):
    seen = {}

    def length(prompts, completions, **kwargs):
        seen.setdefault("prompts", prompts)
        seen.setdefault("completions", completions)
        return [float(len(c[0]["content"])) for c in completions]

    model = build_tiny_lm(chat_tokenizer)
    trainer = make(
        tmp_path,
        chat_tokenizer,
        {"prompt": CHATS},
        reward_funcs=length,
        model=model,
        batch_size=4,
        num_generations=2,
        advantage_estimator="grpo",
    )
    batch, stats = trainer.collect_batch()
    prompt_length = batch.input_ids.shape[1] - batch.response_length
    for row, (ids, mask) in enumerate(zip(batch.input_ids[:, :prompt_length], batch.attention_mask[:, :prompt_length])):
        messages = CHATS[trainer._batch_rows[row]]
        expected = chat_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        # the pad token is <|im_end|>, which the template holds too: the attention mask tells them apart
        assert ids[mask.bool()].tolist() == list(expected)
    assert seen["prompts"][0] == CHATS[trainer._batch_rows[0]]
    assert all(c == [{"role": "assistant", "content": text}] for c, text in zip(seen["completions"], batch.completions))
    assert stats["reward/length"] == sum(len(c) for c in batch.completions) / 4
    before = policy_snapshot(trainer)
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, policy_snapshot(trainer)))


@pytest.mark.parametrize(
    ("prompt", "error", "match"),
    [
        ([{"role": "user"}], ValueError, r"train_dataset\[1\]\[0\] is \{'role': 'user'\}: each message must be a dict"),
        ([{"role": "user", "content": 3}], ValueError, "content of type int: both must be strings"),
        ([], ValueError, r"train_dataset\[1\] is an empty list of messages"),
        (
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "4"}],
            ValueError,
            "ends with an assistant",
        ),
        ("What is 1 + 1?", TypeError, r"train_dataset\[1\] is a str among conversational prompts"),
    ],
)
def test_a_malformed_conversation_fails_at_construction(tmp_path, chat_tokenizer, prompt, error, match):
    with pytest.raises(error, match=match):
        make(tmp_path, chat_tokenizer, [CHATS[0], prompt], reward_fn=WordScoreReward())


def test_chat_prompts_need_a_chat_template(tmp_path, word_tokenizer):
    with pytest.raises(ValueError, match="the tokenizer has no chat template"):
        make(
            tmp_path,
            word_tokenizer,
            {"prompt": [[{"role": "user", "content": "good film"}]]},
            reward_fn=WordScoreReward(),
        )


# ------------------------------------------------------------------ rewards that mutate or overflow (issue 42)
@pytest.mark.parametrize("weights", [[math.nan], [1.0, math.inf], [-math.inf, 1.0]])
def test_reward_weights_must_be_finite_at_construction(weights):
    with pytest.raises(ValueError, match=r"reward_weights\[\d\]=(nan|inf|-inf) \(in reward_weights=.*must be a finite"):
        TRPOConfig(output_dir="runs/x", reward_weights=weights)


def test_a_reward_function_that_edits_its_prompts_never_changes_the_trainers(tmp_path, chat_tokenizer):
    seen = []

    def vandal(prompts, completions, **kwargs):
        seen.append([message["content"] for conversation in prompts for message in conversation])
        for conversation in prompts:
            conversation[-1]["content"] += " EDITED"
            conversation.append({"role": "assistant", "content": "injected"})
        completions[0][0]["content"] = "changed"
        kwargs["completion_ids"].clear()
        return [1.0] * len(completions)

    original = [[dict(m) for m in conversation] for conversation in CHATS]
    trainer = make(
        tmp_path,
        chat_tokenizer,
        {"prompt": CHATS},
        reward_funcs=vandal,
        model=build_tiny_lm(chat_tokenizer),
        max_steps=3,
        batch_size=4,
        num_generations=2,
        advantage_estimator="grpo",
    )
    trainer.train()
    assert trainer.prompt_messages == original
    assert len(seen) == 3 and not any("EDITED" in content for contents in seen for content in contents)


@pytest.mark.parametrize(
    "vandal, match",
    [
        # clears what it was given, then fails: the error names it, not an IndexError of ours
        (lambda prompts, completions: completions.clear() or 1 / 0, r"raised ZeroDivisionError on batch 0 \(first"),
        # pops one and scores what is left: one score short
        (lambda prompts, completions: completions.pop() and [0.0] * len(completions), "returned 7 scores for 8"),
    ],
)
def test_a_reward_that_clears_or_pops_its_completions_is_a_reward_error(vandal, match, tmp_path, word_tokenizer):
    with pytest.raises(RewardError, match=match):
        make(tmp_path, word_tokenizer, TOY_PROMPTS, reward_fn=vandal).train()


def test_an_integer_beyond_float64_is_a_reward_error_naming_the_completion(tmp_path, word_tokenizer):
    def huge(completions, **kwargs):
        return [1.0] * (len(completions) - 1) + [10**400]

    with pytest.raises(RewardError, match=r"'huge' returned an integer of 401 digits for completion 7 on batch 0"):
        make(tmp_path, word_tokenizer, TOY_PROMPTS, reward_funcs=huge).train()


def test_numpy_bools_are_scores_like_python_bools(tmp_path, word_tokenizer):
    import numpy as np

    def is_long(completions, **kwargs):
        return [np.bool_(len(c.split()) > 2) for c in completions]

    def is_long_array(completions, **kwargs):
        return np.array([len(c.split()) > 2 for c in completions])

    (stats,) = make(tmp_path, word_tokenizer, TOY_PROMPTS, reward_funcs=[is_long, is_long_array]).train()
    assert stats["reward/is_long"] == stats["reward/is_long_array"]
    assert stats["reward/mean"] == pytest.approx(2 * stats["reward/is_long"])
