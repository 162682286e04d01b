import pytest
import torch

from trpo_rlhf.advantages import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_controller,
    masked_mean,
    masked_whiten,
    sequence_kl,
    token_rewards,
    value_loss,
)

# Row 0 stops at EOS in the middle (position 2), then padding; row 1 runs to the length cap.
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
LOGP_OLD = torch.tensor([[-1.0, -2.0, -0.5, -9.0, -9.0], [-1.0, -1.0, -1.0, -1.0, -1.0]])
LOGP_REF = torch.tensor([[-1.5, -1.0, -0.5, -1.0, -1.0], [-1.0, -2.0, -1.0, -0.5, -1.0]])
SCORES = torch.tensor([3.0, -1.0])


def test_token_rewards_by_hand():
    rewards = token_rewards(SCORES, LOGP_OLD - LOGP_REF, MASK, kl_coef=0.1)
    expected = torch.tensor(
        [
            # -0.1 * (old - ref); the score lands on the EOS token; padding gets nothing
            [-0.1 * 0.5, -0.1 * -1.0, 0.0 + 3.0, 0.0, 0.0],
            [0.0, -0.1 * 1.0, 0.0, -0.1 * -0.5, 0.0 - 1.0],
        ]
    )
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(sequence_kl(LOGP_OLD, LOGP_REF, MASK), torch.tensor([-0.5, 0.5]))


def test_gae_by_hand_with_eos_in_the_middle_and_padding():
    rewards = torch.tensor([[0.1, 0.2, 1.0, 7.0, 7.0], [0.0, 0.0, 0.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0, 9.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    gamma, lam = 0.9, 0.5
    advantages, returns = gae(rewards, values, MASK, gamma, lam)

    # row 0: V after the EOS (position 2) is 0; padding values (9.0) and rewards (7.0) are ignored
    d2 = 1.0 + gamma * 0.0 - 0.3
    d1 = 0.2 + gamma * 0.3 - 0.4
    d0 = 0.1 + gamma * 0.4 - 0.5
    a2 = d2
    a1 = d1 + gamma * lam * a2
    a0 = d0 + gamma * lam * a1
    # row 1: constant V = 1, reward only at the end
    e = [0.0 + gamma * 1.0 - 1.0] * 4 + [2.0 - 1.0]
    b = [0.0] * 5
    b[4] = e[4]
    for t in (3, 2, 1, 0):
        b[t] = e[t] + gamma * lam * b[t + 1]
    expected = torch.tensor([[a0, a1, a2, 0.0, 0.0], b])
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, (expected + values) * MASK)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(returns, torch.tensor([[6.0, 5.0, 3.0]]))
    torch.testing.assert_close(advantages, torch.tensor([[5.5, 4.5, 2.5]]))


def test_whitening_uses_valid_tokens_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0, 100.0], [4.0, 5.0, 6.0, 7.0, 8.0]])
    w = masked_whiten(x, MASK)
    assert masked_mean(w, MASK).abs().item() < 1e-6
    valid = w[MASK.bool()]
    assert valid.std().item() == pytest.approx(1.0, rel=1e-4)
    assert torch.all(w[~MASK.bool()] == 0)


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_samples=100)  # error clipped to +0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    ctl.update(current_kl=5.4, n_samples=100)  # error -0.1
    assert ctl.value == pytest.approx(0.2 * (1 + 0.002) * (1 - 0.1 * 0.01))
    fixed = FixedKLController(0.3)
    fixed.update(100.0, 100)
    assert fixed.value == 0.3
    assert isinstance(kl_controller(0.1, None, 100), FixedKLController)
    assert isinstance(kl_controller(0.1, 6.0, 100), AdaptiveKLController)


def test_value_loss_clipping_is_pessimistic():
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[0.5, 2.0]])
    mask = torch.ones(1, 2)
    plain = value_loss(new, old, returns, mask, None)
    assert plain.item() == pytest.approx(0.5 * (0.25 + 1.0) / 2)
    clipped = value_loss(new, old, returns, mask, 0.2)
    # position 0: clipped to 0.2 -> (0.8)^2 > 0.25; position 1: clipped 0.2 -> 0.64 < 1.0
    assert clipped.item() == pytest.approx(0.5 * (0.64 + 1.0) / 2)


def test_explained_variance():
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert explained_variance(target, target, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(target, 2.5), target, mask) == pytest.approx(0.0)
