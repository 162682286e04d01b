"""Both Fisher-vector products (double backprop through the KL gradient, and the Gauss-Newton
J^T M J v over one retained graph) equal the Fisher computed by brute force."""

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import functional_call, jacrev

from trpo_rlhf import TRPOConfig
from trpo_rlhf.actor_critic import LoraActorCritic, double_backward_attention
from trpo_rlhf.advantages import masked_mean
from trpo_rlhf.experiments.toy import build_tiny_lm
from trpo_rlhf.rollout import Rollout, response_mask_from_ids
from trpo_rlhf.trust_region import (
    LinearizedLogits,
    categorical_kl,
    fisher_vector_product,
    flat_concat,
    flat_grad,
    forward_tangents,
    gauss_newton_fvp,
    kl_fisher_product,
    logit_fisher_quadratic,
)

TEMPERATURE = 0.8


def tiny_actor_critic(tokenizer, attn_implementation):
    model = build_tiny_lm(tokenizer, hidden_size=16, attn_implementation=attn_implementation, dtype=torch.float32)
    config = TRPOConfig(lora_r=2, lora_target_modules=["q_proj", "v_proj"])
    actor_critic = LoraActorCritic.build(model, config)
    # LoRA B starts at 0, which makes the A-block of the Fisher vanish; randomise it so every
    # parameter has curvature.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in actor_critic.policy_parameters():
            p.normal_(0.0, 0.3)
    return actor_critic


def padded_batch(tokenizer):
    """Left-padded prompts and responses with an EOS in the middle and padding after it."""
    prompts = tokenizer(["the film was", "I felt"], return_tensors="pt", padding=True, padding_side="left")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    words = tokenizer.convert_tokens_to_ids
    responses = torch.tensor(
        [[words("good"), eos, pad, pad], [words("very"), words("sad"), words("and"), words("long")]]
    )
    mask = response_mask_from_ids(responses, eos)
    return Rollout(
        prompts=[],
        completions=[],
        input_ids=torch.cat([prompts.input_ids, responses], 1),
        attention_mask=torch.cat([prompts.attention_mask, mask.long()], 1),
        response_mask=mask,
    )


def jacobian_of_logits(actor_critic, batch):
    """J = d logits / d theta of the policy's response logits, explicitly: [B, T, V, n], with theta
    the flat policy LoRA tensors in `policy_parameters()` order."""
    named = [
        (n, p)
        for n, p in actor_critic.peft_model.named_parameters()
        if any(p is q for q in actor_critic.policy_parameters())
    ]
    names, tensors = zip(*named)
    assert all(a is b for a, b in zip(tensors, actor_critic.policy_parameters()))
    shapes = [t.shape for t in tensors]
    theta0 = flat_concat(tensors).detach()
    inputs = batch.model_inputs()
    T = inputs.pop("response_length")

    def logits_of(theta):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            n = shape.numel()
            params[name] = theta[offset : offset + n].view(shape)
            offset += n
        out = functional_call(
            actor_critic.peft_model, params, kwargs=dict(inputs, logits_to_keep=T + 1, use_cache=False)
        )
        return out.logits[:, :-1] / TEMPERATURE

    return jacrev(logits_of)(theta0), logits_of(theta0)


def brute_force_fisher(actor_critic, batch):
    """F = mean over valid tokens of J_t^T (diag p_t - p_t p_t^T) J_t, with J_t = d logits_t / d theta
    from explicit Jacobians: the Gauss-Newton form of the KL Hessian (Martens, "New insights and
    perspectives on the natural gradient method", JMLR 2020)."""
    jac, logits = jacobian_of_logits(actor_critic, batch)
    probs = torch.softmax(logits, dim=-1)
    fisher = torch.zeros(jac.shape[-1], jac.shape[-1], dtype=torch.float32)
    for b in range(jac.shape[0]):
        for t in range(jac.shape[1]):
            if batch.response_mask[b, t] > 0:
                p = probs[b, t]
                M = torch.diag(p) - torch.outer(p, p)
                J = jac[b, t]
                fisher += J.T @ M @ J
    return fisher / batch.response_mask.sum()


def build_fvp(actor_critic, batch, damping=0.0, method="kl_hessian"):
    with double_backward_attention(actor_critic.peft_model):
        logits = actor_critic.policy_logits(**batch.model_inputs(), temperature=TEMPERATURE)
    return kl_fisher_product(
        logits,
        batch.response_mask,
        actor_critic.policy_parameters(),
        method=method,
        damping=damping,
    )


@pytest.mark.parametrize("method", ["kl_hessian", "gauss_newton"])
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_fvp_matches_brute_force_fisher(word_tokenizer, attn_implementation, method):
    actor_critic = tiny_actor_critic(word_tokenizer, attn_implementation)
    batch = padded_batch(word_tokenizer)
    fvp = build_fvp(actor_critic, batch, method=method)
    with double_backward_attention(actor_critic.peft_model):  # jacrev needs composite attention too
        fisher = brute_force_fisher(actor_critic, batch)
    assert fisher.abs().max() > 1e-6  # a non-trivial matrix
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # the graph is built once and reused for every product
        v = torch.randn(fisher.shape[0], generator=g)
        expected = fisher @ v
        relative_error = ((fvp(v) - expected).norm() / expected.norm()).item()
        assert relative_error <= 1e-4, relative_error


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_forward_mode_fisher_quadratic_matches_brute_force_and_leaves_the_model_as_it_was(
    word_tokenizer, attn_implementation
):
    """v^T F v from one forward with tangents (J v, no graph) against explicit Jacobians; inside
    `forward_tangents` the logits' tangent is J v itself, and after it the LoRA tensors are the
    model's own Parameters again, with their values."""
    actor_critic = tiny_actor_critic(word_tokenizer, attn_implementation)
    batch = padded_batch(word_tokenizer)
    params = actor_critic.policy_parameters()
    with double_backward_attention(actor_critic.peft_model):
        fisher = brute_force_fisher(actor_critic, batch)
        jac, _ = jacobian_of_logits(actor_critic, batch)
    weights = batch.response_mask / batch.response_mask.sum()
    before = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(fisher.shape[0], generator=g)
        with (
            torch.no_grad(),
            double_backward_attention(actor_critic.peft_model),
            forward_tangents(actor_critic.peft_model, params, v),
        ):
            logits, tangent = forward_ad.unpack_dual(
                actor_critic.policy_logits(**batch.model_inputs(), temperature=TEMPERATURE)
            )
            quadratic = logit_fisher_quadratic(logits, tangent, weights)
        assert torch.allclose(tangent, jac @ v, rtol=1e-4, atol=1e-6)
        assert quadratic.item() == pytest.approx((v @ fisher @ v).item(), rel=1e-4)
    assert actor_critic.policy_parameters() == params
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in actor_critic.policy_parameters())
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    with pytest.raises(ValueError, match="not a parameter of the module"):
        with forward_tangents(actor_critic.peft_model, [torch.zeros(3)], torch.zeros(3)):
            pass


def test_linearized_logits_products_and_the_gradient_from_its_build(word_tokenizer):
    """J v and J^T w against explicit Jacobians, and the value of the build at u = dL/dlogits is
    dL/dtheta itself: the trainer takes TRPO's gradient from the Fisher's graph this way."""
    actor_critic = tiny_actor_critic(word_tokenizer, "sdpa")
    batch = padded_batch(word_tokenizer)
    params = actor_critic.policy_parameters()
    with double_backward_attention(actor_critic.peft_model):
        logits = actor_critic.policy_logits(**batch.model_inputs(), temperature=TEMPERATURE)
    advantages = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(1))
    loss = masked_mean(
        torch.log_softmax(logits, -1).gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1) * advantages,
        batch.response_mask,
    )
    expected_grad = flat_grad(loss, params, retain_graph=True)
    (loss_logits_grad,) = torch.autograd.grad(loss, logits)
    jacobian = LinearizedLogits(logits, params, at=loss_logits_grad)
    assert expected_grad.norm() > 0
    torch.testing.assert_close(jacobian.vjp_at, expected_grad, rtol=1e-5, atol=1e-8)

    with double_backward_attention(actor_critic.peft_model):
        jac, _ = jacobian_of_logits(actor_critic, batch)  # [B, T, V, n]
    g = torch.Generator().manual_seed(2)
    v, w = torch.randn(jac.shape[-1], generator=g), torch.randn(logits.shape, generator=g)
    torch.testing.assert_close(jacobian.jvp(v), jac @ v, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(jacobian.vjp(w), torch.einsum("btvn,btv->n", jac, w), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["kl_hessian", "gauss_newton"])
def test_fvp_adds_damping(word_tokenizer, method):
    actor_critic = tiny_actor_critic(word_tokenizer, "eager")
    batch = padded_batch(word_tokenizer)
    plain, damped = build_fvp(actor_critic, batch, 0.0, method), build_fvp(actor_critic, batch, 0.5, method)
    v = torch.randn(sum(p.numel() for p in actor_critic.policy_parameters()), dtype=torch.float32)
    torch.testing.assert_close(damped(v), plain(v) + 0.5 * v)


def test_fused_sdpa_has_no_double_backward_so_the_fallback_is_exercised(word_tokenizer):
    """Without `double_backward_attention`, the same FVP fails on the fused CPU SDPA kernel, which
    has no double backward: the sdpa case above passes only because of the fallback."""
    actor_critic = tiny_actor_critic(word_tokenizer, "sdpa")
    batch = padded_batch(word_tokenizer)
    logp = torch.log_softmax(actor_critic.policy_logits(**batch.model_inputs()), dim=-1)
    mean_kl = masked_mean(categorical_kl(logp.detach(), logp), batch.response_mask)
    fvp = fisher_vector_product(mean_kl, actor_critic.policy_parameters(), 0.0)
    with pytest.raises(RuntimeError, match="not implemented"):
        fvp(torch.ones(sum(p.numel() for p in actor_critic.policy_parameters())))


def test_double_backward_attention_switches_other_implementations_and_restores(word_tokenizer):
    model = build_tiny_lm(word_tokenizer, attn_implementation="eager")
    # An implementation with no double backward of its own (flex attention stands in for the
    # GPU-only FlashAttention kernels): switched to SDPA (math) inside, restored on exit.
    model.set_attn_implementation("flex_attention")
    with double_backward_attention(model):
        assert model.config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "flex_attention"


def test_gauss_newton_fvp_needs_the_double_backward_path_too(word_tokenizer):
    """J v differentiates the backward graph, so the Gauss-Newton form also fails on the fused
    kernel without `double_backward_attention`: the trainer builds both inside it."""
    actor_critic = tiny_actor_critic(word_tokenizer, "sdpa")
    batch = padded_batch(word_tokenizer)
    logits = actor_critic.policy_logits(**batch.model_inputs())
    fvp = gauss_newton_fvp(
        LinearizedLogits(logits, actor_critic.policy_parameters()), batch.response_mask / batch.response_mask.sum(), 0.0
    )
    with pytest.raises(RuntimeError, match="not implemented"):
        fvp(torch.ones(sum(p.numel() for p in actor_critic.policy_parameters())))


def test_bf16_autocast_fvp_stays_float32_and_close_to_the_float32_fisher(word_tokenizer):
    """With `bf16=True` the forwards run in bfloat16, but the products CG works with are float32
    and agree with the float32 Fisher to bfloat16 precision."""
    actor_critic = tiny_actor_critic(word_tokenizer, "eager")
    batch = padded_batch(word_tokenizer)
    v = torch.randn(
        sum(p.numel() for p in actor_critic.policy_parameters()), generator=torch.Generator().manual_seed(3)
    )
    exact = build_fvp(actor_critic, batch, method="gauss_newton")(v)
    actor_critic.autocast_dtype = torch.bfloat16
    with actor_critic.autocast():
        assert actor_critic.peft_model(input_ids=batch.input_ids).logits.dtype == torch.bfloat16  # autocast is on
    mixed = build_fvp(actor_critic, batch, method="gauss_newton")(v)
    assert mixed.dtype == torch.float32
    relative_error = ((mixed - exact).norm() / exact.norm()).item()
    assert 0 < relative_error < 5e-2, relative_error


@pytest.mark.parametrize("method", ["kl_hessian", "gauss_newton"])
def test_a_deleted_fvp_frees_its_graph_at_once(word_tokenizer, method):
    """No reference cycle: the graph goes with the last reference, not whenever the cyclic GC runs
    (a cycle here cost 1-2.5 GB of RSS per TRPO step on SmolLM2)."""
    import gc
    import weakref

    actor_critic = tiny_actor_critic(word_tokenizer, "eager")
    batch = padded_batch(word_tokenizer)
    gc.disable()
    try:
        fvp = build_fvp(actor_critic, batch, method=method)
        fvp(torch.ones(sum(p.numel() for p in actor_critic.policy_parameters())))
        assert fvp.calls == 1
        alive = weakref.ref(fvp)
        del fvp
        assert alive() is None
    finally:
        gc.enable()
