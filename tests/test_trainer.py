import dataclasses
import json
import math

import pytest
import torch
from conftest import bitwise_equal, policy_snapshot, toy_eval_reward

from trpo_rlhf import RewardError, TRPOConfig
from trpo_rlhf.experiments.toy import TOY_PROMPTS, WordCountReward, build_tiny_lm
from trpo_rlhf.trust_region import restore, snapshot

REQUIRED_METRICS = (
    "step reward/mean reward/std kl/ref kl/coef trpo/kl trpo/step_frac trpo/accepted trpo/surrogate_gain "
    "trpo/expected_gain trpo/cg_residual trpo/line_search_iters value/loss value/explained_variance policy/entropy "
    "time/generate time/score time/policy_update time/value_update time/step memory/peak_mb"
).split()


def test_accepted_steps_stay_inside_the_trust_region(make_trainer):
    trainer = make_trainer(max_kl=0.02, kl_tolerance=1.2, cg_damping=1e-3)
    accepted = 0
    for _ in range(4):
        stats = trainer.step()
        if stats["trpo/accepted"]:
            accepted += 1
            assert 0 < stats["trpo/kl"] <= 1.2 * 0.02
            assert stats["trpo/surrogate_gain"] > 0
            assert 0 < stats["trpo/step_frac"] <= 1
        else:
            assert stats["trpo/kl"] == 0 and stats["trpo/step_frac"] == 0
    assert accepted >= 3


def test_failed_line_search_restores_policy_bitwise(make_trainer):
    trainer = make_trainer(accept_ratio=1e9, line_search_steps=3)  # no point can realise 1e9 x the predicted gain
    trainer.step()  # a first step moves the value function; the policy must not move at all
    before = policy_snapshot(trainer)
    stats = trainer.step()
    assert stats["trpo/accepted"] == 0 and stats["trpo/line_search_iters"] == 3
    assert stats["trpo/kl"] == 0 and stats["trpo/step_frac"] == 0
    assert bitwise_equal(before, policy_snapshot(trainer))


def test_value_update_never_moves_the_policy(make_trainer):
    trainer = make_trainer(value_epochs=3, value_minibatch_size=2, value_lr=1e-2, lora_dropout=0.1)
    trainer.step()  # make the value targets non-trivial
    from trpo_rlhf.rollout import evaluate_rollout, sample_completions

    rollout, _ = sample_completions(trainer.actor_critic.peft_model, trainer.tokenizer, TOY_PROMPTS[:8], 6, 1.0)
    rollout = evaluate_rollout(trainer.actor_critic, rollout, 1.0)
    rollout.scores = torch.arange(8, dtype=torch.float32)
    batch, _ = trainer._advantages(rollout)
    policy_before = policy_snapshot(trainer)
    value_before = [p.detach().clone() for p in trainer.actor_critic.value_parameters()]
    stats = trainer.value_update(batch)
    assert math.isfinite(stats["value/loss"])
    assert bitwise_equal(policy_before, policy_snapshot(trainer))
    assert not bitwise_equal(value_before, [p.detach() for p in trainer.actor_critic.value_parameters()])
    assert all(p.requires_grad for p in trainer.actor_critic.policy_parameters())  # policy adapter re-activated
    # Dropout (lora_dropout=0.1 here) acted in the critic update only: the passes the trust region
    # measures are deterministic again.
    assert not trainer.actor_critic.peft_model.training
    first, second = trainer.policy_log_probs(batch), trainer.policy_log_probs(batch)
    assert torch.equal(first, second)


def test_the_rollout_takes_the_old_log_probs_from_generation(make_trainer):
    trainer = make_trainer()
    calls = {"policy_logits": 0}
    original = trainer.actor_critic.policy_logits

    def counted(*args, **kwargs):
        calls["policy_logits"] += 1
        return original(*args, **kwargs)

    trainer.actor_critic.policy_logits = counted
    batch, _ = trainer.collect_batch()
    assert calls == {"policy_logits": 0}
    trainer.actor_critic.policy_logits = original
    forward = trainer.actor_critic.policy_logits(**batch.model_inputs(), temperature=trainer.config.temperature)
    expected = torch.gather(torch.log_softmax(forward, -1), -1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(batch.logp_old, expected * batch.response_mask, atol=1e-5, rtol=1e-5)


def test_only_policy_lora_tensors_are_in_the_update(make_trainer):
    trainer = make_trainer()
    policy = trainer.actor_critic.policy_parameters()
    names = [n for n, p in trainer.actor_critic.peft_model.named_parameters() if any(p is q for q in policy)]
    assert names and all("lora_" in n and ".default." in n for n in names)
    assert all(("q_proj" in n or "v_proj" in n) for n in names)
    value_ids = {id(p) for p in trainer.actor_critic.value_parameters()}
    assert not value_ids & {id(p) for p in policy}
    base_before = {
        n: p.detach().clone() for n, p in trainer.actor_critic.peft_model.named_parameters() if "lora_" not in n
    }
    trainer.step()
    for n, p in trainer.actor_critic.peft_model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n


def test_metrics_jsonl_has_every_documented_key(make_trainer, tmp_path):
    trainer = make_trainer(max_steps=2, save_steps=1)
    trainer.train()
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        assert (tmp_path / "run" / checkpoint / "adapter_model.safetensors").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        missing = [k for k in REQUIRED_METRICS if k not in row]
        assert not missing, missing
        assert all(isinstance(v, (int, float)) for v in row.values())
        # The default solve: one Fisher-vector product per CG iteration, cg_iters of them unless CG
        # met its tolerance first, and CG's relative residual below where it started (1 at x = 0).
        cg_iters = TRPOConfig.cg_iters
        assert 1 <= row["trpo/cg_iters"] == row["trpo/fvp_count"] <= cg_iters
        assert row["trpo/cg_iters"] == cg_iters or row["trpo/cg_residual"] <= TRPOConfig.cg_residual_tol
        assert 0 <= row["trpo/cg_residual"] < 1
    assert rows[0]["kl/ref"] == pytest.approx(0.0, abs=1e-5)  # LoRA B = 0 at init: policy == reference


def test_save_pretrained_reloads_policy_and_value(make_trainer, tmp_path, word_tokenizer):
    from peft import PeftModel

    trainer = make_trainer(max_steps=2, value_lr=1e-2)
    trainer.train()
    out = tmp_path / "run"
    assert (out / "adapter_model.safetensors").exists() and (out / "trainer_config.json").exists()
    assert TRPOConfig.load(out / "trainer_config.json") == trainer.config

    batch = trainer.tokenizer(["the film was", "it was"], return_tensors="pt", padding=True, padding_side="left").to(
        trainer.device
    )
    with torch.no_grad():
        expected = trainer.actor_critic.peft_model(**batch).logits
    reloaded = PeftModel.from_pretrained(build_tiny_lm(word_tokenizer), out).to(trainer.device)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected)

    fresh = make_trainer(
        model=PeftModel.from_pretrained(build_tiny_lm(word_tokenizer), out), output_dir=str(tmp_path / "again")
    )
    fresh.load_value_function(out)
    inputs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=(batch.attention_mask.cumsum(1) - 1).clamp(min=0),
        response_length=2,
    )
    with torch.no_grad():
        torch.testing.assert_close(fresh.actor_critic.values(**inputs), trainer.actor_critic.values(**inputs))
        assert trainer.actor_critic.values(**inputs).abs().sum() > 0


def test_a_given_peft_model_is_used_as_is(make_trainer, word_tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        build_tiny_lm(word_tokenizer), LoraConfig(r=2, target_modules=["k_proj"]), adapter_name="mine"
    )
    trainer = make_trainer(model=peft_model)
    names = [
        n
        for n, p in trainer.actor_critic.peft_model.named_parameters()
        if any(p is q for q in trainer.actor_critic.policy_parameters())
    ]
    assert names and all(".mine." in n and "k_proj" in n for n in names)
    before = policy_snapshot(trainer)
    stats = trainer.step()
    assert stats["trpo/accepted"] == 1
    assert not bitwise_equal(before, policy_snapshot(trainer))


def test_reward_failure_keeps_finished_work(make_trainer, tmp_path):
    calls = []

    def flaky(prompts, completions):
        calls.append(1)
        if len(calls) == 2:
            raise ZeroDivisionError("scorer crashed")
        return [1.0] * len(completions)

    trainer = make_trainer(reward_fn=flaky, max_steps=5)
    with pytest.raises(RewardError, match=r"ZeroDivisionError on batch 1.*scorer crashed"):
        trainer.train()
    out = tmp_path / "run"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "checkpoint-1" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "returned,match",
    [
        (lambda n: [0.0] * (n - 1), r"returned 7 scores for 8 completions on batch 0"),
        (lambda n: "oops", r"returned str on batch 0"),
        (
            lambda n: "1" * n,
            r"returned str on batch 0",
        ),  # one string, as long as the batch: not one score per character
        (lambda n: ["1.0"] * n, r"returned str '1.0' for completion 0 on batch 0; each score must be a number"),
        (lambda n: {"score": 1.0}, r"returned dict on batch 0"),
    ],
)
def test_bad_reward_outputs_raise_clear_errors(make_trainer, returned, match):
    trainer = make_trainer(reward_fn=lambda prompts, completions: returned(len(completions)))
    with pytest.raises(RewardError, match=match):
        trainer.step()


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"max_kl": 0.0}, r"max_kl=0.0 must be in \(0, 1.0\] nats per completion"),
        ({"max_kl": -1.0}, r"max_kl=-1.0"),
        ({"cg_iters": 0}, r"cg_iters=0 must be >= 1"),
        ({"backtrack_coef": 1.0}, r"backtrack_coef=1.0 must lie strictly between 0 and 1"),
        ({"backtrack_coef": 0.0}, r"backtrack_coef=0.0"),
        ({"batch_size": 0}, r"batch_size=0 must be >= 1"),
        ({"kl_tolerance": 0.5}, r"kl_tolerance=0.5"),
        ({"fvp_subsample": 0.0}, r"fvp_subsample=0.0"),
        ({"fvp_method": "exact"}, r"fvp_method='exact' is not one of"),
        ({"fisher_chunks": 0}, r"fisher_chunks=0 must be >= 1"),
        ({"temperature": 0.0}, r"temperature=0.0"),
        ({"held_out_kl_prompts": -1}, r"held_out_kl_prompts=-1 must be >= 0"),
        (
            {"compile_generation": True, "bf16": True},
            r"compile_generation=True with bf16=True over a float32 base.*--model_dtype bfloat16",
        ),
    ],
)
def test_invalid_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        TRPOConfig(**overrides)


def test_empty_dataset_raises(make_trainer):
    with pytest.raises(ValueError, match="train_dataset is empty"):
        make_trainer(train_dataset=[])
    from datasets import Dataset

    with pytest.raises(ValueError, match="train_dataset is empty"):
        make_trainer(train_dataset=Dataset.from_dict({"prompt": []}))
    with pytest.raises(ValueError, match=r"no 'prompt' column \(it has \['text'\]\)"):
        make_trainer(train_dataset=Dataset.from_dict({"text": ["the film"]}))


def test_prompt_longer_than_context_raises(make_trainer):
    long_prompt = " ".join(["the"] * 125)  # context is 128 tokens
    with pytest.raises(
        ValueError, match=r"Prompt 1 is 125 tokens; with max_new_tokens=6 that exceeds the model's context of 128"
    ):
        make_trainer(train_dataset=["the film", long_prompt])


def test_model_without_target_modules_raises(make_trainer):
    with pytest.raises(
        ValueError, match=r"lora_target_modules=\['c_attn'\]: \['c_attn'\] match no module of LlamaForCausalLM.*q_proj"
    ):
        make_trainer(lora_target_modules=["c_attn"])
    # PEFT would adapt q_proj and silently ignore the typo.
    with pytest.raises(ValueError, match=r"\['nope'\] match no module of LlamaForCausalLM"):
        make_trainer(lora_target_modules=["q_proj", "nope"])


def test_tokenizer_without_pad_token_is_handled(make_trainer, word_tokenizer):
    word_tokenizer.pad_token = None
    assert word_tokenizer.pad_token_id is None
    trainer = make_trainer()
    assert trainer.tokenizer.pad_token_id == word_tokenizer.eos_token_id
    # Prompts of different lengths are left-padded with that token, and the step goes through.
    stats = trainer.step()
    assert stats["trpo/accepted"] == 1.0 and 0 < stats["trpo/kl"] <= 1.5 * trainer.config.max_kl


def test_fvp_subsample_uses_a_fraction_of_sequences(make_trainer):
    # 2 of the batch's 8 sequences, in one pass, for 3 CG iterations' products
    trainer = make_trainer(fvp_subsample=0.25, fisher_chunks=1, cg_iters=3)
    fisher_batch_sizes = []
    fisher_logits = trainer.fisher_logits

    def recording_fisher_logits(batch):
        fisher_batch_sizes.append(len(batch))
        return fisher_logits(batch)

    trainer.fisher_logits = recording_fisher_logits
    stats = trainer.step()
    assert fisher_batch_sizes == [2]  # the Fisher's one forward saw 2 sequences ...
    assert stats["trpo/fvp_count"] == stats["trpo/cg_iters"] >= 1  # ... and every product reused it
    assert stats["trpo/accepted"] == 1.0


@pytest.mark.parametrize("cg_iters", [1, 3])
def test_an_update_draws_its_fisher_subsample_once(make_trainer, cg_iters):
    """The Fisher's sequences are drawn once per update, whether they serve products or the
    one-iteration quadratic: the minibatch generator advances by one draw."""
    trainer = make_trainer(fvp_subsample=0.5, cg_iters=cg_iters)
    draws = []
    fisher_batch = trainer.fisher_batch

    def recording_fisher_batch(batch):
        draws.append(len(batch))
        return fisher_batch(batch)

    trainer.fisher_batch = recording_fisher_batch
    batch, _ = trainer.collect_batch()
    stats = trainer.policy_update(batch)
    assert draws == [len(batch)] and stats["trpo/accepted"] == 1.0


def test_gradient_from_the_fishers_graph_equals_the_gradient_of_its_own_pass(make_trainer):
    """With the whole batch's Fisher, g is the value of the Fisher's graph built at dL/dlogits
    (both FVP forms share that forward); with a subsampled Fisher, g has its own forward and
    backward. The same vector either way, on the whole batch."""
    trainer = make_trainer()
    batch, _ = trainer.collect_batch()
    params = trainer.actor_critic.policy_parameters()
    origin = [p.detach().clone() for p in params]
    stats = {}
    for setting in ({"fvp_method": "gauss_newton"}, {"fvp_method": "kl_hessian"}, {"fvp_subsample": 0.5}):
        trainer.config = TRPOConfig(**(dataclasses.asdict(trainer.config) | setting))
        stats[str(setting)] = trainer.policy_update(batch)
        with torch.no_grad():
            for p, o in zip(params, origin):
                p.copy_(o)
    norms = [s["trpo/grad_norm"] for s in stats.values()]
    surrogates = [s["trpo/surrogate_old"] for s in stats.values()]
    assert norms[0] > 0
    assert norms == pytest.approx([norms[0]] * 3, rel=1e-5)
    assert surrogates == pytest.approx([surrogates[0]] * 3, rel=1e-4, abs=1e-7)


def test_tiny_model_learns_word_count_reward_in_30_steps(tmp_path, word_tokenizer):
    """A randomly initialised tiny LM learns to say 'good' more often: 30 TRPO steps."""
    from trpo_rlhf import TRPOTrainer

    config = TRPOConfig(
        output_dir=str(tmp_path / "learn"),
        max_steps=30,
        batch_size=16,
        max_new_tokens=8,
        seed=0,
        max_kl=0.05,
        cg_damping=1e-3,
        lora_target_modules=["q_proj", "v_proj", "lm_head"],
    )
    trainer = TRPOTrainer(
        config=config,
        model=build_tiny_lm(word_tokenizer),
        tokenizer=word_tokenizer,
        reward_fn=WordCountReward("good"),
        train_dataset=TOY_PROMPTS,
    )
    before = toy_eval_reward(trainer)
    history = trainer.train()
    after = toy_eval_reward(trainer)
    accepted = [h for h in history if h["trpo/accepted"]]
    assert len(accepted) >= 25
    assert after > before + 0.5, (before, after)
    # With a correct Fisher, the measured KL of a step is close to frac^2 * 1/2 s^T F s (its second-order prediction).
    ratios = sorted(h["trpo/kl"] / h["trpo/kl_predicted"] for h in accepted)
    assert 0.7 < ratios[len(ratios) // 2] < 1.3, ratios


def test_the_step_is_sized_by_the_fisher_alone_and_damped_relative_to_its_curvature(make_trainer):
    """1/2 s^T (n F) s = delta for the full step s, F the Fisher of the mean per-token KL and n the
    tokens per completion (delta bounds the KL of a completion): the damping shapes its direction, never its length
    (an absolute damping counted as KL once spent a fraction of delta set by the model); and the
    damping is cg_damping times the Fisher's curvature along g, g^T F g / g^T g."""
    trainer = make_trainer(cg_damping=1.0, cg_iters=4, fisher_chunks=1)
    trainer.step()
    batch, _ = trainer.collect_batch()
    params = trainer.actor_critic.policy_parameters()
    origin = snapshot(params)
    captured = {}
    line_search = trainer.line_search

    def capture(batch, logp_all_old, full_step, expected_gain):
        captured["step"] = full_step.clone()
        return line_search(batch, logp_all_old, full_step, expected_gain)

    trainer.line_search = capture
    stats = trainer.policy_update(batch)
    restore(params, origin)
    grad = trainer.chunked_gradient(batch, 1)[0]
    fvp = trainer.fisher_product(batch)
    step = captured["step"]
    tokens_per_completion = (batch.response_mask.sum() / len(batch)).item()
    assert tokens_per_completion > 1  # else the test could not tell a per-token delta from this one
    completion_quadratic = tokens_per_completion * torch.dot(step, fvp.undamped(step)).item()
    assert 0.5 * completion_quadratic == pytest.approx(trainer.config.max_kl, rel=1e-3)
    curvature = torch.dot(grad, fvp.undamped(grad)).item() / torch.dot(grad, grad).item()
    assert stats["trpo/damping"] == pytest.approx(1.0 * curvature, rel=1e-3)
    assert stats["trpo/kl_predicted"] == pytest.approx(trainer.config.max_kl * stats["trpo/step_frac"] ** 2)


def test_the_update_spends_its_kl_whatever_the_adapters_scale(make_trainer, tmp_path):
    """lora_alpha scales the LoRA tensors' gradient by alpha / r and their Fisher by its square: a
    10,000-fold range between alpha 4 and 400. The damping scales with the Fisher, so the first
    update is the same function-space step at both ends, and every update's realised KL stays
    near delta (measured: 0.75, 0.46, 0.69, 0.69 delta at 4; 0.75, 0.53, 0.71, 0.49 at 400). At
    the former absolute damping the share of delta spent followed the scale."""
    history = {}
    for alpha in (4, 400):  # one after the other: a trainer seeds the global random state when built
        trainer = make_trainer(lora_alpha=alpha, output_dir=str(tmp_path / f"alpha{alpha}"))
        history[alpha] = [trainer.step() for _ in range(4)]
    first = {alpha: rows[0] for alpha, rows in history.items()}
    assert first[400]["trpo/kl"] == pytest.approx(first[4]["trpo/kl"], rel=1e-3)
    assert first[400]["trpo/damping"] == pytest.approx(1e4 * first[4]["trpo/damping"], rel=1e-3)
    for alpha, rows in history.items():
        ratios = sorted(h["trpo/kl"] / trainer.config.max_kl for h in rows if h["trpo/accepted"])
        assert len(ratios) == 4 and 0.5 <= ratios[2] <= 1.2, (alpha, ratios)


def test_gpt2_architecture_trains(make_trainer, word_tokenizer):
    """The hub task's policy is a GPT-2: Conv1D attention (c_attn), PEFT's default targets, no pad token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(word_tokenizer),
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            bos_token_id=word_tokenizer.eos_token_id,
            eos_token_id=word_tokenizer.eos_token_id,
        )
    ).eval()
    trainer = make_trainer(model=gpt2, lora_target_modules=None)
    names = [
        n
        for n, p in trainer.actor_critic.peft_model.named_parameters()
        if any(p is q for q in trainer.actor_critic.policy_parameters())
    ]
    assert names and all("c_attn" in n for n in names)
    before = policy_snapshot(trainer)
    stats = trainer.step()
    assert stats["trpo/accepted"] == 1 and 0 < stats["trpo/kl"] <= 1.5 * trainer.config.max_kl
    assert not bitwise_equal(before, policy_snapshot(trainer))


def test_both_fvp_methods_take_the_same_step(make_trainer):
    """Gauss-Newton and double-backward FVPs are the same Fisher, so from one rollout the two
    trainers solve the same system and land on the same policy (up to float rounding)."""
    results = {}
    for method in ("gauss_newton", "kl_hessian"):
        trainer = make_trainer(fvp_method=method)
        batch, _ = trainer.collect_batch()
        stats = trainer.policy_update(batch)
        results[method] = (stats, torch.cat([p.detach().reshape(-1) for p in trainer.actor_critic.policy_parameters()]))
    (gn_stats, gn_theta), (kh_stats, kh_theta) = results["gauss_newton"], results["kl_hessian"]
    assert gn_stats["trpo/accepted"] == kh_stats["trpo/accepted"] == 1.0
    # float32 rounding differs between the two products and CG amplifies it a little over 10 steps
    assert gn_stats["trpo/kl"] == pytest.approx(kh_stats["trpo/kl"], rel=2e-2)
    assert ((gn_theta - kh_theta).norm() / kh_theta.norm()).item() < 1e-2


def batch_of_unequal_lengths(trainer):
    """A rollout of `trainer` in which sequence i ends i % 4 tokens early: chunks of sequences then
    hold unequal shares of the batch's tokens."""
    batch, _ = trainer.collect_batch()
    mask = batch.response_mask.clone()
    for i in range(len(batch)):
        mask[i, mask.shape[1] - i % 4 :] = 0
    return dataclasses.replace(batch, response_mask=mask)


@pytest.mark.parametrize("fvp_method", ["gauss_newton", "kl_hessian"])
def test_fisher_chunks_give_the_gradient_fisher_and_step_of_one_pass(make_trainer, fvp_method):
    """Split into chunks of sequences (one chunk's graph at a time), the gradient, every Fisher
    product and hence the step are those of the whole batch's single pass. Sequences of unequal
    length make the chunks' token shares unequal."""
    results = {}
    for chunks in (1, 3):
        trainer = make_trainer(fisher_chunks=chunks, fvp_method=fvp_method, cg_iters=3, max_kl=0.01)
        batch = batch_of_unequal_lengths(trainer)
        params = trainer.actor_critic.policy_parameters()
        v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
        fvp = trainer.fisher_product(batch)
        product = fvp(v)
        del fvp
        stats = trainer.policy_update(batch)
        theta = torch.cat([p.detach().reshape(-1) for p in params])
        results[chunks] = (product, stats, theta)
    (p1, s1, t1), (p3, s3, t3) = results[1], results[3]
    assert torch.allclose(p1, p3, rtol=1e-4, atol=1e-7 * p1.abs().max().item())
    assert s1["trpo/accepted"] == s3["trpo/accepted"] == 1.0
    assert s3["trpo/grad_norm"] == pytest.approx(s1["trpo/grad_norm"], rel=1e-4)
    assert s3["trpo/cg_iters"] == s1["trpo/cg_iters"] == s3["trpo/fvp_count"] == 3
    assert s3["trpo/kl"] == pytest.approx(s1["trpo/kl"], rel=1e-3)
    assert ((t3 - t1).norm() / t1.norm()).item() < 1e-4


@pytest.mark.parametrize("chunks", [1, 3])
def test_the_one_iteration_step_is_sized_by_the_forward_mode_fisher_quadratic(make_trainer, chunks):
    """At one CG iteration the step is g sized by g^T (F + cI) g, which forward-mode passes give
    with no Fisher-vector product: the quadratic is that of the product, and the full step's length
    is sqrt(2 delta / (n g^T F g)) |g| with g^T F g from the product and n the tokens per completion.
    Sequences of unequal length make the chunks' token shares unequal."""
    trainer = make_trainer(fisher_chunks=chunks, cg_iters=1, max_kl=0.01)
    batch = batch_of_unequal_lengths(trainer)
    params = trainer.actor_critic.policy_parameters()
    with torch.no_grad():  # B = 0 at init leaves the A tensors out of the Fisher: move off it
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    fvp = trainer.fisher_product(batch)
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(0))
    assert trainer.fisher_quadratic(batch, v) == pytest.approx(torch.dot(v, fvp(v)).item(), rel=1e-4)
    grad, _, _ = trainer.chunked_gradient(batch, 1)
    grad_quadratic = torch.dot(grad, fvp(grad)).item()
    del fvp
    stats = trainer.policy_update(batch)
    assert stats["trpo/accepted"] == 1.0 and stats["trpo/fvp_count"] == 0 and stats["trpo/cg_iters"] == 1
    full_step_norm = stats["trpo/step_norm"] / stats["trpo/step_frac"]
    tokens_per_completion = (batch.response_mask.sum() / len(batch)).item()
    expected = math.sqrt(2 * trainer.config.max_kl / (tokens_per_completion * grad_quadratic)) * grad.norm().item()
    assert full_step_norm == pytest.approx(expected, rel=1e-4)
    assert stats["trpo/kl"] <= trainer.config.kl_tolerance * trainer.config.max_kl


@pytest.mark.parametrize("cg_iters", [1, 10])
def test_a_batch_without_a_gradient_takes_no_step(make_trainer, cg_iters):
    """All advantages 0: g = 0, no direction, the policy stays bitwise where it was."""
    trainer = make_trainer(cg_iters=cg_iters)
    trainer.step()
    batch, _ = trainer.collect_batch()
    before = policy_snapshot(trainer)
    stats = trainer.policy_update(dataclasses.replace(batch, advantages=torch.zeros_like(batch.advantages)))
    assert stats["trpo/grad_norm"] == 0.0 and stats["trpo/accepted"] == 0.0 and stats["trpo/fvp_count"] == 0
    assert bitwise_equal(before, policy_snapshot(trainer))


def test_bf16_autocast_trains_with_float32_trust_region(make_trainer):
    trainer = make_trainer(bf16=True)
    assert trainer.actor_critic.autocast_dtype == torch.bfloat16
    stats = trainer.step()
    assert stats["trpo/accepted"] == 1.0
    assert stats["trpo/kl"] <= trainer.config.kl_tolerance * trainer.config.max_kl
    assert all(p.dtype == torch.float32 for p in trainer.actor_critic.policy_parameters())


def test_compiled_generation_samples_the_updated_policy_and_compiles_once(make_trainer):
    """After a step (a policy update, the critic's adapter trained and switched back) the compiled
    decode step samples the new policy, whose log-probs the rollout takes as logp_old, through the
    graph the first step compiled."""
    from torch._dynamo.utils import counters

    from trpo_rlhf.rollout import gather_tokens

    trainer = make_trainer(compile_generation=True)
    before = policy_snapshot(trainer)
    counters.clear()
    assert trainer.step()["trpo/accepted"] == 1.0
    assert counters["stats"]["unique_graphs"] >= 1  # the decode step was compiled
    assert not bitwise_equal(before, policy_snapshot(trainer))
    with torch._dynamo.config.patch(error_on_recompile=True):
        batch, _ = trainer.collect_batch()
    mask = batch.response_mask.bool()
    with torch.no_grad():
        logp_now = gather_tokens(trainer.policy_log_probs(batch), batch.response_ids)
    torch.testing.assert_close(logp_now[mask], batch.logp_old[mask], atol=1e-4, rtol=1e-4)


def test_compiled_generation_runs_on_a_bfloat16_base_under_autocast(make_trainer):
    """The setting the float32-base refusal points to: one static cache holds bfloat16 keys and values."""
    trainer = make_trainer(model_dtype="bfloat16", bf16=True, compile_generation=True)
    assert trainer.step()["trpo/accepted"] == 1.0
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert trainer.step()["trpo/kl"] <= trainer.config.kl_tolerance * trainer.config.max_kl


def fixed_value_batch(trainer):
    """A batch with spread-out returns, sampled with a fixed seed."""
    from trpo_rlhf.rollout import evaluate_rollout, sample_completions

    with torch.random.fork_rng():
        torch.manual_seed(5)
        rollout, _ = sample_completions(trainer.actor_critic.peft_model, trainer.tokenizer, TOY_PROMPTS[:8], 6, 1.0)
    rollout = evaluate_rollout(trainer.actor_critic, rollout, 1.0)
    rollout.scores = torch.arange(8, dtype=torch.float32, device=trainer.device)
    batch, _ = trainer._advantages(rollout)
    return batch


def test_the_critic_trains_its_lora_adapter_and_fits_better_than_its_head_alone(make_trainer):
    trainer = make_trainer(value_epochs=2, value_lr=1e-2)
    value_lora = {n: p.detach().clone() for n, p in trainer.actor_critic.trainable_tensors().items() if ".value." in n}
    assert value_lora and all("lora_" in n for n in value_lora)
    trainer.step()
    moved = {n: p for n, p in trainer.actor_critic.trainable_tensors().items() if n in value_lora}
    assert all(not torch.equal(value_lora[n], moved[n]) for n in value_lora), "a critic LoRA tensor did not move"
    assert all(moved[n].abs().sum() > 0 for n in value_lora if "lora_B" in n)  # B starts at zero

    final_loss = {}
    for head_only in (False, True):
        critic = make_trainer(value_epochs=1, value_lr=1e-2, value_clip_range=None)
        if head_only:  # what the critic was when its adapter never received gradients
            critic.value_optimizer = torch.optim.Adam(critic.actor_critic.value_head.parameters(), lr=1e-2)
        batch = fixed_value_batch(critic)
        losses = [critic.value_update(batch)["value/loss"] for _ in range(30)]
        final_loss[head_only] = losses[-1]
    assert final_loss[False] < 0.5 * final_loss[True], final_loss


def strict_rows(path):
    def reject(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ["trpo", "ppo"])
def test_update_cosine_compares_consecutive_changes_of_the_policy(make_trainer, word_tokenizer, tmp_path, algorithm):
    from test_ppo import make_ppo

    trainer = make_trainer() if algorithm == "trpo" else make_ppo(tmp_path, word_tokenizer)
    snapshots, stats = [policy_snapshot(trainer)], []
    for _ in range(3):
        stats.append(trainer.step())
        snapshots.append(policy_snapshot(trainer))
    changes = [torch.cat([(b - a).flatten() for a, b in zip(x, y)]) for x, y in zip(snapshots, snapshots[1:])]
    assert "policy/update_cosine" not in stats[0]
    for k in (1, 2):
        assert changes[k].norm() > 0 and changes[k - 1].norm() > 0
        expected = torch.dot(changes[k], changes[k - 1]) / (changes[k].norm() * changes[k - 1].norm())
        assert stats[k]["policy/update_cosine"] == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_reward_rejects_the_step_and_restores_the_trainer(make_trainer, tmp_path, bad):
    from trpo_rlhf.experiments.toy import WordScoreReward

    score, calls = WordScoreReward(), []

    def reward(prompts, completions):
        calls.append(1)
        scores = score(prompts, completions)
        return [bad] + scores[1:] if len(calls) == 2 else scores

    trainer = make_trainer(reward_fn=reward, max_steps=3)
    trainer.step()
    after_step_1 = {n: p.detach().clone() for n, p in trainer.actor_critic.trainable_tensors().items()}
    with pytest.warns(UserWarning, match=r"Step 2: non-finite reward; the step's updates are rejected"):
        stats = trainer.step()
    assert stats["update/nonfinite"] == 1.0 and "trpo/kl" not in stats
    now = trainer.actor_critic.trainable_tensors()
    assert all(torch.equal(after_step_1[n], now[n]) for n in now)
    stats = trainer.step()
    assert stats["update/nonfinite"] == 0.0  # the run goes on
    assert "policy/update_cosine" in stats  # against step 1's change: the undone one left none
    rows = strict_rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["reward/mean"] is None  # the non-finite mean, as JSON null


def test_consecutive_non_finite_steps_stop_the_run_and_nothing_non_finite_is_saved(make_trainer, tmp_path):
    from trpo_rlhf import NonFiniteError
    from trpo_rlhf.experiments.toy import WordScoreReward

    score, calls = WordScoreReward(), []

    def reward(prompts, completions):
        calls.append(1)
        return score(prompts, completions) if len(calls) == 1 else [float("nan")] * len(completions)

    trainer = make_trainer(reward_fn=reward, max_steps=10, max_nonfinite_steps=3, save_steps=1)
    with (
        pytest.warns(UserWarning, match="non-finite reward"),
        pytest.raises(NonFiniteError, match=r"Step 4: .*3 such step"),
    ):
        trainer.train()
    from safetensors.torch import load_file

    def saved(step):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        return load_file(checkpoint / "adapter_model.safetensors") | load_file(
            checkpoint / "value" / "value_head.safetensors"
        )

    # Steps 2 and 3 were rejected: their checkpoints hold step 1's tensors, all finite; step 4 stopped the run.
    assert all(torch.isfinite(t).all() for t in saved(3).values())
    assert all(torch.equal(saved(1)[k], saved(3)[k]) for k in saved(1))
    assert not (tmp_path / "run" / "checkpoint-4").exists()
    assert [r["step"] for r in strict_rows(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_huge_rewards_keep_advantages_finite():
    from trpo_rlhf.advantages import masked_whiten

    mask = torch.ones(2, 3)
    values = torch.tensor([[1e30, 0.0, 0.0], [0.0, -1e30, 0.0]])  # squares overflow float32
    whitened = masked_whiten(values, mask)
    assert torch.isfinite(whitened).all() and whitened.dtype == torch.float32
    assert whitened[0, 0] > 1 and whitened[1, 1] < -1


@pytest.mark.parametrize("algorithm", ["trpo", "ppo"])
def test_a_non_finite_policy_gradient_is_caught_before_any_parameter_moves(
    make_trainer, tmp_path, word_tokenizer, algorithm
):
    from trpo_rlhf import PPOConfig, PPOTrainer
    from trpo_rlhf.engine import NonFiniteUpdate

    if algorithm == "trpo":
        trainer = make_trainer()
    else:
        trainer = PPOTrainer(
            config=PPOConfig(
                output_dir=str(tmp_path / "ppo"),
                batch_size=8,
                max_new_tokens=6,
                lora_target_modules=["q_proj", "v_proj"],
            ),
            model=build_tiny_lm(word_tokenizer),
            tokenizer=word_tokenizer,
            reward_fn=WordCountReward(),
            train_dataset=TOY_PROMPTS,
        )
    batch, _ = trainer.collect_batch()
    batch.advantages[0, 0] = float("nan")
    before = policy_snapshot(trainer)
    with pytest.raises(NonFiniteUpdate, match="policy gradient"):
        trainer.policy_update(batch)
    assert bitwise_equal(before, policy_snapshot(trainer))


@pytest.mark.parametrize(
    "dataset,match",
    [
        (["the film", None], r"train_dataset\[1\] is a NoneType, None; every prompt must be a string"),
        ([{"prompt": "the film"}], r"train_dataset\[0\] is a dict.*\[row\['prompt'\] for row in rows\]"),
        (["the film", 3], r"train_dataset\[1\] is a int, 3"),
    ],
)
def test_prompts_that_are_not_strings_are_refused(make_trainer, dataset, match):
    with pytest.raises(TypeError, match=match):
        make_trainer(train_dataset=dataset)


def test_a_tokenizer_larger_than_the_embedding_is_refused(make_trainer, word_tokenizer):
    from trpo_rlhf.experiments.toy import build_word_tokenizer

    small_model = build_tiny_lm(build_word_tokenizer(words=["the", "film"]))
    with pytest.raises(
        ValueError,
        match=rf"tokenizer has {len(word_tokenizer)} tokens but the model's embedding has 5 rows.*resize_token_embeddings",
    ):
        make_trainer(model=small_model)


def test_an_unusable_output_dir_fails_at_construction(make_trainer, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(NotADirectoryError, match=r"output_dir=.*a_file' is a file"):
        make_trainer(output_dir=str(a_file))
    with pytest.raises(PermissionError, match=r"output_dir=.*a_file/run' is not writable"):
        make_trainer(output_dir=str(a_file / "run"))


@pytest.mark.parametrize("path", ["/no/such/model", "./no_such_model", "runs/no/such/model"])
def test_a_missing_local_model_path_is_named(make_trainer, tmp_path, path):
    with pytest.raises(FileNotFoundError, match=r"model path .* does not exist"):
        make_trainer(model=path)
    with pytest.raises(FileNotFoundError, match=r"holds no config.json"):
        make_trainer(model=str(tmp_path))


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"max_kl": "0.01"}, r"max_kl='0.01' must be float, not str"),
        ({"temperature": float("inf")}, r"temperature=inf must be a finite number"),
        ({"value_lr": float("inf")}, r"value_lr=inf must be a finite number"),
        ({"lora_alpha": 0}, r"lora_alpha=0 must be > 0"),
        ({"batch_size": 2.5}, r"batch_size=2.5 must be int, not float"),
        ({"save_total_limit": 0}, r"save_total_limit=0 must be >= 1"),
        ({"max_nonfinite_steps": 0}, r"max_nonfinite_steps=0 must be >= 1"),
    ],
)
def test_wrong_types_and_non_finite_settings_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        TRPOConfig(**overrides)


@pytest.mark.parametrize("algorithm", ["trpo", "ppo"])
def test_held_out_kl_measures_the_update_on_other_prompts_and_leaves_the_run_unchanged(
    make_trainer, word_tokenizer, tmp_path, algorithm, monkeypatch
):
    from test_ppo import make_ppo

    def build(held_out_kl_prompts, folder):
        if algorithm == "trpo":
            return make_trainer(output_dir=str(tmp_path / folder), held_out_kl_prompts=held_out_kl_prompts)
        return make_ppo(tmp_path / folder, word_tokenizer, held_out_kl_prompts=held_out_kl_prompts)

    # One after the other: both seed the process's random stream at construction.
    plain = build(0, "plain")
    plain_rows = [plain.step() for _ in range(2)]
    measured = build(4, "measured")
    seen = []  # (batch prompts, held-out rollout, pi_old's log-probs on it, pi_old's LoRA tensors)
    collect_batch, sample_held_out = measured.collect_batch, measured.sample_held_out

    def spy_collect(timer=None):
        batch, stats = collect_batch(timer)
        seen.append([batch.prompts])
        return batch, stats

    def spy_sample():
        rollout, logp_all_old = sample_held_out()
        seen[-1] += [rollout, logp_all_old, policy_snapshot(measured)]
        return rollout, logp_all_old

    monkeypatch.setattr(measured, "collect_batch", spy_collect)
    monkeypatch.setattr(measured, "sample_held_out", spy_sample)
    for plain_stats in plain_rows:
        measured_stats = measured.step()
        batch_prompts, rollout, logp_all_old, policy_old = seen[-1]
        # Other prompts than the batch's, sampled from the policy before the update.
        assert len(rollout.prompts) == 4 and not set(rollout.prompts) & set(batch_prompts)
        after = policy_snapshot(measured)
        for p, old in zip(measured.actor_critic.policy_parameters(), policy_old):
            p.data.copy_(old)
        with torch.no_grad():
            assert torch.allclose(measured.policy_log_probs(rollout), logp_all_old, atol=1e-6)
        for p, new in zip(measured.actor_critic.policy_parameters(), after):
            p.data.copy_(new)
        # The exact KL(pi_old || pi_new) over the vocabulary, summed over a completion's tokens, averaged
        # over the completions (the unit of delta and kl/ref).
        with torch.no_grad():
            logp_all_new = measured.policy_log_probs(rollout)
        per_token = (logp_all_old.exp() * (logp_all_old - logp_all_new)).sum(-1)
        expected = (per_token * rollout.response_mask).sum() / len(rollout)
        assert measured_stats["policy/kl_held_out"] > 0
        assert measured_stats["policy/kl_held_out"] == pytest.approx(expected.item(), rel=1e-4)
        assert measured_stats["time/held_out_kl"] > 0

        # The measurement draws on a random stream of its own: the run is the one without it.
        def exact(stats):  # every metric but timings, to the last bit (json writes a NaN as NaN)
            return json.dumps(
                {k: v for k, v in stats.items() if not k.startswith(("time/", "memory/"))}, sort_keys=True
            )

        measured_stats.pop("policy/kl_held_out")
        assert exact(measured_stats) == exact(plain_stats)
    assert bitwise_equal(policy_snapshot(plain), policy_snapshot(measured))


def test_held_out_kl_needs_prompts_outside_the_batch(make_trainer):
    # 12 toy prompts, 8 a batch: 4 can be held out, 5 cannot.
    make_trainer(held_out_kl_prompts=4)
    with pytest.raises(ValueError, match=r"held_out_kl_prompts=5 .* 12 prompts, 13 are needed.*--held_out_kl_prompts"):
        make_trainer(held_out_kl_prompts=5)
