import torch
from transformers import GenerationConfig

from trpo_rlhf import TRPOConfig
from trpo_rlhf.actor_critic import LoraActorCritic
from trpo_rlhf.experiments.toy import TOY_PROMPTS, build_tiny_lm
from trpo_rlhf.rollout import evaluate_rollout, response_mask_from_ids, sample_completions, token_logprobs


def actor_critic_for(model):
    actor_critic = LoraActorCritic.build(model, TRPOConfig(lora_target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(3)
    with torch.no_grad():  # a policy that differs from the reference
        for p in actor_critic.policy_parameters():
            p.normal_(0.0, 0.2)
    return actor_critic


def test_response_mask_keeps_tokens_up_to_and_including_first_eos():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 2, 2], [5, 2, 7, 2, 0], [5, 6, 7, 8, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
    assert torch.equal(response_mask_from_ids(ids, eos), expected)


def test_logprobs_are_those_of_the_distribution_sampled_from(tiny_lm, word_tokenizer):
    """generate() must sample from softmax(logits / temperature) and nothing else, even when the
    checkpoint asks for top-k / repetition penalty (the vocabulary, 67 tokens, exceeds the global
    top_k default of 50), and our forward must reproduce those log-probs."""
    actor_critic = actor_critic_for(tiny_lm)
    tiny_lm.generation_config = GenerationConfig(top_k=5, repetition_penalty=1.5, suppress_tokens=[7])
    temperature = 0.7
    torch.manual_seed(0)
    rollout, scores = sample_completions(
        actor_critic.peft_model, word_tokenizer, TOY_PROMPTS[:6], 8, temperature, return_scores=True
    )
    assert tiny_lm.generation_config.top_k == 5  # restored after generation
    rollout = evaluate_rollout(actor_critic, rollout, temperature)
    mask = rollout.response_mask.bool()
    sampled = torch.log_softmax(scores.float(), dim=-1)
    ours = torch.log_softmax(actor_critic.policy_logits(**rollout.model_inputs(), temperature=temperature), dim=-1)
    # every vocabulary entry keeps its probability: no truncation happened
    assert torch.isfinite(sampled[mask]).all()
    torch.testing.assert_close(ours[mask], sampled[mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        rollout.logp_old[mask], token_logprobs(scores.float(), rollout.response_ids)[mask], atol=1e-4, rtol=1e-4
    )


def test_left_padding_does_not_change_logprobs(tiny_lm, word_tokenizer):
    """A short prompt padded in a batch gets the same log-probs as alone (position ids count real tokens)."""
    actor_critic = actor_critic_for(tiny_lm)
    torch.manual_seed(0)
    batch, _ = sample_completions(
        actor_critic.peft_model, word_tokenizer, ["it was", "we thought the plot was very"], 5, 1.0
    )
    batch = evaluate_rollout(actor_critic, batch, 1.0)
    alone = batch.select([0])
    pad = int((alone.attention_mask[0, : -alone.response_length] == 0).sum())
    assert pad > 0
    alone.input_ids, alone.attention_mask = alone.input_ids[:, pad:], alone.attention_mask[:, pad:]
    alone = evaluate_rollout(actor_critic, alone, 1.0)
    m = batch.response_mask[0].bool()
    torch.testing.assert_close(alone.logp_old[0][m], batch.logp_old[0][m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.values[0][m], batch.values[0][m], atol=1e-5, rtol=1e-5)


def test_reference_is_the_base_model_and_completions_decode_the_masked_tokens(tiny_lm, word_tokenizer):
    actor_critic = actor_critic_for(tiny_lm)
    torch.manual_seed(1)
    rollout, _ = sample_completions(actor_critic.peft_model, word_tokenizer, TOY_PROMPTS[:4], 8, 1.0)
    rollout = evaluate_rollout(actor_critic, rollout, 1.0)
    untouched_base = build_tiny_lm(word_tokenizer)  # same seed, same weights, no LoRA injected
    with torch.no_grad():
        base_logits = untouched_base(
            input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
        ).logits[:, -rollout.response_length - 1 : -1]
    expected_ref = token_logprobs(base_logits, rollout.response_ids) * rollout.response_mask
    torch.testing.assert_close(rollout.logp_ref, expected_ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rollout.logp_ref, rollout.logp_old)  # the adapter is really on for the policy
    for ids, mask, text in zip(rollout.response_ids, rollout.response_mask, rollout.completions):
        kept = [t for t in ids[mask.bool()].tolist() if t != word_tokenizer.eos_token_id]
        assert text == word_tokenizer.decode(kept, skip_special_tokens=True)


def test_sampling_logits_stand_in_for_the_policy_forward(tiny_lm, word_tokenizer):
    """The logits generation sampled from give the policy forward's logp_old and entropy, and leave
    the reference log-probs and the values as they are."""
    actor_critic = actor_critic_for(tiny_lm)
    torch.manual_seed(2)
    sampled, sampling_logits = sample_completions(
        actor_critic.peft_model, word_tokenizer, TOY_PROMPTS[:6], 8, 0.7, return_scores=True
    )
    from_forward = evaluate_rollout(actor_critic, sampled, 0.7)
    from_sampling = evaluate_rollout(actor_critic, sampled, 0.7, sampling_logits)
    assert from_forward.response_mask.sum() > from_forward.response_mask.shape[0]  # more than one token a row
    for name in ("logp_old", "entropy"):
        torch.testing.assert_close(getattr(from_sampling, name), getattr(from_forward, name), atol=1e-5, rtol=1e-5)
    for name in ("logp_ref", "values"):
        assert torch.equal(getattr(from_sampling, name), getattr(from_forward, name))


def test_compiled_static_cache_samples_the_current_policy_without_retracing(tiny_lm, word_tokenizer):
    """With `static_cache_length` generation decodes through a compiled step over a fixed-size cache:
    it samples from the policy's own distribution, sees the LoRA tensors as an update leaves them
    (written in place, as both trainers do), and runs a batch of other prompt lengths through the
    same graph."""
    actor_critic = actor_critic_for(tiny_lm)
    cache_length = max(len(word_tokenizer(p)["input_ids"]) for p in TOY_PROMPTS) + 8

    def sampled_matches_policy(prompts):
        rollout, scores = sample_completions(
            actor_critic.peft_model,
            word_tokenizer,
            prompts,
            8,
            0.7,
            return_scores=True,
            static_cache_length=cache_length,
        )
        mask = rollout.response_mask.bool()
        assert mask.sum() > mask.shape[0]  # more than one decoded token a row
        policy = actor_critic.policy_logits(**rollout.model_inputs(), temperature=0.7)
        torch.testing.assert_close(
            torch.log_softmax(policy, -1)[mask], torch.log_softmax(scores.float(), -1)[mask], atol=1e-4, rtol=1e-4
        )

    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    sampled_matches_policy(TOY_PROMPTS[:6])
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step was compiled
    with torch.no_grad():  # a policy update: the LoRA tensors change in place
        for p in actor_critic.policy_parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    shorter = [" ".join(p.split()[:2]) for p in TOY_PROMPTS[6:12]]
    with torch._dynamo.config.patch(error_on_recompile=True):
        sampled_matches_policy(shorter)
