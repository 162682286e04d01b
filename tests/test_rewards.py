import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from trpo_rlhf.experiments.toy import build_word_tokenizer
from trpo_rlhf.rewards import RewardError, SequenceClassifierReward, VaderReward, build_reward_fn, score_batch


def test_vader_scores_sentiment_offline():
    reward = build_reward_fn("vader")
    assert isinstance(reward, VaderReward)
    good, bad, neutral = reward(
        ["The film"] * 3, [" was wonderful, I loved it.", " was awful and boring.", " was released in May."]
    )
    assert good > 0.5 and bad < -0.5 and neutral == 0.0
    with_prompt = VaderReward(include_prompt=True)(["A terrible"], [" day"])
    assert with_prompt[0] < 0


@pytest.fixture
def tiny_classifier(tmp_path):
    """A sequence classifier with its own word-level tokenizer (a vocabulary different from the
    policy's), saved like a hub checkpoint."""
    tokenizer = build_word_tokenizer(words="movie good bad the was film great awful it".split())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
        id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1},
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForSequenceClassification(config).eval()
    path = tmp_path / "classifier"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model, tokenizer


def test_sequence_classifier_reward_is_the_positive_logit_on_its_own_tokens(tiny_classifier):
    path, model, tokenizer = tiny_classifier
    reward = build_reward_fn(str(path))
    assert isinstance(reward, SequenceClassifierReward) and reward.label_index == 1
    prompts, completions = ["the movie", "it was"], [" was good", " awful"]
    scores = reward(prompts, completions)
    for prompt, completion, score in zip(prompts, completions, scores):
        with torch.no_grad():
            expected = model(**tokenizer(prompt + completion, return_tensors="pt")).logits[0, 1].item()
        assert score == pytest.approx(expected, abs=1e-5)


def test_classifier_label_choice_and_errors(tiny_classifier):
    path, _, _ = tiny_classifier
    assert SequenceClassifierReward(str(path), label="NEGATIVE").label_index == 0
    assert SequenceClassifierReward(str(path), label=1).label_index == 1
    with pytest.raises(
        ValueError, match=r"label='JOY' is not one of the classifier's labels \['NEGATIVE', 'POSITIVE'\]"
    ):
        SequenceClassifierReward(str(path), label="JOY")
    with pytest.raises(ValueError, match="label=5 is out of range"):
        SequenceClassifierReward(str(path), label=5)


def test_build_reward_fn_rejects_non_rewards():
    with pytest.raises(TypeError, match="reward_fn=3 is not usable"):
        build_reward_fn(3)
    fn = lambda p, c: [0.0] * len(c)  # noqa: E731
    assert build_reward_fn(fn) is fn


def test_score_batch_accepts_tensors_and_checks_shape():
    scores = score_batch(lambda p, c: torch.tensor([1.0, 2.0]), ["a", "b"], ["x", "y"], batch_index=4)
    assert scores.tolist() == [1.0, 2.0]
    with pytest.raises(RewardError, match="returned 1 scores for 2 completions on batch 4"):
        score_batch(lambda p, c: [1.0], ["a", "b"], ["x", "y"], batch_index=4)
