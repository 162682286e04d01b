"""The cross-fitted share of a step's predicted gain (`trpo/cross_fitted_gain_ratio`): how much of
what the batch predicts its step buys is signal rather than the batch's own noise; and
`signal_shrinkage`, which scales each LoRA tensor's part of the step by its running share."""

import dataclasses
import itertools

import pytest
import torch
from conftest import bitwise_equal, policy_snapshot

from trpo_rlhf import TRPOConfig
from trpo_rlhf.advantages import masked_mean
from trpo_rlhf.rollout import token_logprobs
from trpo_rlhf.trust_region import TensorSignalShares, cross_fitted_gain, flat_grad


def test_the_cross_fitted_gain_is_unbiased_where_the_in_sample_one_adds_the_noise():
    """Over every sign pattern of independent chunk noises e_j around a mean gradient G, the
    cross-fitted gain of a linear step z(g) = P^-1 (g + carry) averages to G^T P^-1 (G + carry)
    exactly; the in-sample gain adds sum_j w_j^2 e_j^T P^-1 e_j, the noise's projection onto its
    own step."""
    signal = torch.tensor([1.0, -2.0, 0.5, 0.0])
    noises = torch.tensor([[3.0, 0.0, 1.0, -1.0], [0.0, 2.0, -1.0, 4.0], [1.0, 1.0, 1.0, 1.0]])
    shares = torch.tensor([0.5, 0.3, 0.2])
    carry = torch.tensor([0.2, 0.1, -0.3, 0.4])
    scale = torch.tensor([1.0, 2.0, 0.5, 4.0])  # P^-1 r = r / scale

    def precondition(r):
        return r / scale

    def step_direction(g):
        return precondition(g + carry)

    cross, in_sample = [], []
    for signs in itertools.product([1.0, -1.0], repeat=3):
        chunk_means = signal + torch.tensor(signs).unsqueeze(1) * noises
        c, s = cross_fitted_gain(chunk_means * shares.unsqueeze(1), shares, step_direction)
        cross.append(c)
        in_sample.append(s)
    expected = torch.dot(signal, precondition(signal + carry)).item()
    noise = sum(w**2 * torch.dot(e, precondition(e)).item() for w, e in zip(shares.tolist(), noises))
    assert sum(cross) / len(cross) == pytest.approx(expected, rel=1e-5)
    assert sum(in_sample) / len(in_sample) == pytest.approx(expected + noise, rel=1e-5)
    assert noise > expected  # the noise is a real share of the in-sample gain


def test_equal_chunks_cross_fit_to_the_in_sample_gain_and_one_chunk_is_refused():
    g = torch.tensor([1.0, 2.0, -1.0])
    shares = torch.tensor([0.25, 0.75])
    cross, in_sample = cross_fitted_gain(g * shares.unsqueeze(1), shares)
    assert cross == pytest.approx(in_sample) and in_sample == pytest.approx(6.0)
    with pytest.raises(ValueError, match="needs >= 2 chunks"):
        cross_fitted_gain(g.unsqueeze(0), torch.tensor([1.0]))


def test_the_trainers_gain_ratio_is_the_cross_fit_of_its_chunks_gradients(make_trainer):
    """r from the update equals the cross-fit of per-chunk surrogate gradients taken here by hand
    (no preconditioner, no momentum: the step is along g)."""
    trainer = make_trainer(fisher_chunks=2, cg_preconditioner="none", momentum=0.0)
    batch, _ = trainer.collect_batch()
    params = trainer.actor_critic.policy_parameters()
    total = batch.response_mask.sum()
    chunk_grads, shares = [], []
    for index in torch.arange(len(batch)).chunk(2):
        chunk = batch.select(index)
        ratio = torch.exp(token_logprobs(trainer.policy_logits(chunk), chunk.response_ids) - chunk.logp_old)
        share = chunk.response_mask.sum() / total
        chunk_grads.append(share * flat_grad(masked_mean(ratio * chunk.advantages, chunk.response_mask), params))
        shares.append(share)
    g1, g2 = (c / w for c, w in zip(chunk_grads, shares))
    g = sum(chunk_grads)
    # Two chunks: each scores the other's gradient, so r = g1.g2 / |g|^2.
    expected = torch.dot(g1, g2).item() / torch.dot(g, g).item()
    stats = trainer.policy_update(batch)
    assert stats["trpo/cross_fitted_gain_ratio"] == pytest.approx(expected, rel=1e-4)


def chunks_of_the_same_sequences(batch, advantage_scales):
    """`batch`'s first sequences repeated once per chunk, chunk j's advantages times advantage_scales[j]:
    every chunk's gradient is the first's times its scale, and every chunk has an equal token share."""
    n = len(batch) // len(advantage_scales)
    repeated = batch.select(torch.arange(n).repeat(len(advantage_scales)))
    scale = torch.tensor(advantage_scales).repeat_interleave(n).unsqueeze(1)
    return dataclasses.replace(repeated, advantages=repeated.advantages * scale)


@pytest.mark.parametrize(
    "preconditioner, scales, ratio",
    [
        ("none", [1.0, 1.0, 1.0, 1.0], 1.0),
        ("none", [1.0, 1.0, 1.0, 0.2], 0.6 / 0.64),
        # The first update's preconditioner is P = |g| of the gradient it is given: remade from any
        # part of the batch, the step is sign(G), so r = 1 whatever the scales (a P kept from the
        # whole batch would give 0.6 / 0.64 again).
        ("gradient_rms", [1.0, 1.0, 1.0, 0.2], 1.0),
    ],
)
def test_chunks_along_one_gradient_cross_fit_to_the_share_the_step_makes_of_them(
    make_trainer, preconditioner, scales, ratio
):
    """Chunk gradients a_j G (the same sequences in every chunk, advantages scaled by a_j), steps
    along g: in-sample gain (mean a)^2 |G|^2, cross-fitted sum_j w_j a_j mean_-j(a) |G|^2."""
    trainer = make_trainer(fisher_chunks=4, cg_preconditioner=preconditioner)
    batch, _ = trainer.collect_batch()
    stats = trainer.policy_update(chunks_of_the_same_sequences(batch, scales))
    assert stats["trpo/cross_fitted_gain_ratio"] == pytest.approx(ratio, rel=1e-5)


def test_a_batch_that_contradicts_itself_cross_fits_below_zero(make_trainer):
    """The same sequences with advantages of opposite sign in the second chunk: each chunk's step
    loses on the other, r = -0.5 / 0.0625."""
    trainer = make_trainer(fisher_chunks=2, cg_preconditioner="none", momentum=0.0)
    batch, _ = trainer.collect_batch()
    stats = trainer.policy_update(chunks_of_the_same_sequences(batch, [1.0, -0.5]))
    assert stats["trpo/cross_fitted_gain_ratio"] == pytest.approx(-8.0, rel=1e-5)


def test_the_ratio_is_reported_only_where_the_gradient_comes_in_chunks(make_trainer):
    trainer = make_trainer(fisher_chunks=1)
    batch, _ = trainer.collect_batch()
    assert "trpo/cross_fitted_gain_ratio" not in trainer.policy_update(batch)


def test_signal_shares_are_running_means_of_the_gains_and_survive_a_state_round_trip():
    shares = TensorSignalShares(beta=0.5)
    assert shares.weights() is None
    shares.record(torch.tensor([1.0, 0.2, -0.5]), torch.tensor([2.0, 1.0, 1.0]))
    shares.record(torch.tensor([0.0, 0.2, 0.1]), torch.tensor([2.0, 1.0, 1.0]))
    # Moving averages from zero at beta 0.5: 0.25, 0.15, -0.075 over 1.5, 0.75, 0.75; the last clips to 0.
    torch.testing.assert_close(shares.weights(), torch.tensor([0.25 / 1.5, 0.2, 0.0]))
    restored = TensorSignalShares(beta=0.5)
    restored.load_state_dict(shares.state_dict())
    torch.testing.assert_close(restored.weights(), shares.weights())


def test_the_first_shrunk_update_is_the_plain_one(make_trainer):
    """Before any batch has been cross-fitted every tensor's share is 1."""
    plain = make_trainer()
    shrunk = make_trainer(signal_shrinkage=True)
    batch, _ = plain.collect_batch()
    plain.policy_update(batch)
    stats = shrunk.policy_update(batch)
    assert bitwise_equal(policy_snapshot(plain), policy_snapshot(shrunk))
    assert stats["trpo/signal_shrinkage_mean"] == 1.0
    assert shrunk.signal_shares.weights() is not None
    assert "policy_signal_shares" in shrunk.optimizers() and "policy_signal_shares" not in plain.optimizers()


def test_a_tensor_with_no_signal_share_does_not_move(make_trainer):
    """Shares of 1 on one LoRA B tensor and 0 on every other: the step moves that tensor alone,
    sized to the trust region as any step."""
    trainer = make_trainer(signal_shrinkage=True, max_kl=0.01)
    params = trainer.actor_critic.policy_parameters()
    names = {id(p): n for n, p in trainer.actor_critic.named_parameters()}
    moved = next(i for i, p in enumerate(params) if "lora_B" in names[id(p)])
    one_hot = torch.zeros(len(params))
    one_hot[moved] = 1.0
    trainer.signal_shares.load_state_dict({"cross_fitted": one_hot, "in_sample": torch.ones(len(params))})
    batch, _ = trainer.collect_batch()
    before = policy_snapshot(trainer)
    stats = trainer.policy_update(batch)
    assert stats["trpo/accepted"] == 1.0 and 0 < stats["trpo/kl"] <= 1.5 * 0.01
    after = policy_snapshot(trainer)
    for i, (b, a) in enumerate(zip(before, after)):
        assert torch.equal(a, b) != (i == moved), f"tensor {i} ({names[id(params[i])]})"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"fisher_chunks": 1}, "fisher_chunks >= 2"),
        ({"batch_size": 1}, "batch_size >= 2"),
        ({"cg_iters": 3}, "one-iteration step"),
        ({"max_token_kl": 0.3}, "no max_token_kl"),
        ({"signal_shrinkage_beta": 1.0}, "must lie in"),
    ],
)
def test_bad_shrinkage_settings_are_refused_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        TRPOConfig(output_dir="unused", signal_shrinkage=True, **overrides)
