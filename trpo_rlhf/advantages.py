"""Token-level rewards, the KL-coefficient controllers, GAE, group advantages and whitening: pure
tensor functions.

Shapes: B sequences, T response positions. ``mask[b, t]`` is 1 for response tokens up to and
including the first EOS and 0 after it (a valid prefix of every row).

    >>> import torch
    >>> mask = torch.tensor([[1.0, 1.0, 0.0]])
    >>> rewards = token_rewards(torch.tensor([2.0]), torch.zeros(1, 3), mask, kl_coef=0.1)
    >>> rewards
    tensor([[0., 2., 0.]])
    >>> advantages, returns = gae(rewards, torch.zeros(1, 3), mask, gamma=1.0, gae_lambda=1.0)
    >>> advantages
    tensor([[2., 2., 0.]])
"""

from __future__ import annotations

import torch


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is 1 (token-level mean over the whole batch)."""
    return masked_sum(values, mask) / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the valid positions."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    sum_sq = masked_sum((values - mean) ** 2, mask)
    return sum_sq / (count - 1).clamp(min=1)


def whitening_factor(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 / std over the valid positions (float64), the factor `masked_whiten` scales by. The
    moments are taken in float64: squared float32 values overflow from |x| ~ 1.8e19 (a reward of
    1e30 would turn every advantage into NaN), squared float64 ones only past 1e154."""
    return torch.rsqrt(masked_var(values.double(), mask.double()) + eps)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the valid positions (in float64, `whitening_factor`); invalid
    positions come back as 0."""
    wide, wide_mask = values.double(), mask.double()
    mean = masked_mean(wide, wide_mask)
    whitened = (wide - mean) * whitening_factor(values, mask, eps)
    return (whitened * wide_mask).to(values.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last valid response token of each row (the EOS, or the length cap)."""
    return (mask.sum(dim=1).long() - 1).clamp(min=0)


def token_rewards(scores: torch.Tensor, token_kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards r_t = -beta * KL_t, plus the sequence score on the last valid token
    (Ziegler et al. 2019, eq. 2; Stiennon et al. 2020). KL_t estimates the KL to the reference at
    token t, here the sampled log-ratio log pi_old(a_t|s_t) - log pi_ref(a_t|s_t) (Ziegler et al.),
    whose score function gives KL_t's own gradient in expectation."""
    rewards = 0.0 - kl_coef * token_kl * mask  # not -(...): a zero penalty stays +0
    rows = torch.arange(scores.shape[0], device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores.to(device=rewards.device, dtype=rewards.dtype)
    return rewards


def sequence_kl(logp_old: torch.Tensor, logp_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sampled estimate of KL(pi || pi_ref) for each completion: the sum over its tokens of
    log pi - log pi_ref. Its batch mean is `kl/ref` and the input of the adaptive controller."""
    return masked_sum(logp_old - logp_ref, mask, dim=1)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) along response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after the last valid token,
    A_t = sum_l (gamma * lambda)^l delta_{t+l}, returns R_t = A_t + V_t. Both are 0 where mask is 0.
    """
    values = values * mask
    next_advantage = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        # mask[:, t+1] is 0 past the last token, so the bootstrap value there is 0 (terminal state).
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = (delta + gamma * gae_lambda * next_advantage) * mask[:, t]
        advantages[:, t] = next_advantage
    returns = (advantages + values) * mask
    return advantages, returns


GROUP_SCALE_EPS = 1e-4  # TRL's GRPOTrainer: advantages / (std + 1e-4)


def group_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    num_generations: int,
    estimator: str,
    gamma: float = 1.0,
    scale_rewards: str = "group",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Critic-free advantages for rows that come in groups of `num_generations` completions of one
    prompt (consecutive rows): the return-to-go G_t of the token rewards (`token_rewards`) minus a
    baseline from the group's returns G_0, the same at every token of a completion.

    - ``"grpo"``: the group's mean (Shao et al. 2024, eq. 3), divided by the group's std
      (`scale_rewards` "group"), the batch's ("batch") or not ("none"), as TRL's GRPOTrainer;
    - ``"rloo"``: the mean of the group's other completions, an unbiased baseline (Ahmadian et al. 2024).

    With no KL penalty G_t is the score, and these are exactly TRL's GRPO and RLOO advantages; with
    one, a token is charged the KL of the tokens from it on (not those before it). Returns
    (advantages, G_t), both [B, T] and 0 where `mask` is 0.

        >>> import torch
        >>> rewards = token_rewards(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.zeros(4, 2), torch.ones(4, 2), 0.0)
        >>> group_advantages(rewards, torch.ones(4, 2), 2, "rloo")[0][:, 0]
        tensor([ 1., -1.,  0.,  0.])
    """
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    grouped = returns[:, 0].double().view(-1, num_generations)
    if estimator == "rloo":
        baseline = (grouped.sum(1, keepdim=True) - grouped) / (num_generations - 1)
        scale = torch.ones_like(grouped)
    elif estimator == "grpo":
        baseline = grouped.mean(1, keepdim=True).expand_as(grouped)
        if scale_rewards == "group":
            scale = grouped.std(1, keepdim=True).expand_as(grouped) + GROUP_SCALE_EPS
        elif scale_rewards == "batch":
            scale = grouped.std().expand_as(grouped) + GROUP_SCALE_EPS
        else:
            scale = torch.ones_like(grouped)
    else:
        raise ValueError(f"estimator={estimator!r} is not a group estimator: use 'grpo' or 'rloo'.")
    advantages = (returns.double() - baseline.reshape(-1, 1)) / scale.reshape(-1, 1)
    return (advantages * mask).to(rewards.dtype), returns


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None,
) -> torch.Tensor:
    """0.5 * mean over valid tokens of (V - R)^2; with `clip_range`, the pessimistic max with the
    loss of V clipped to old_V +- clip_range (the value clipping of PPO2 / TRL's cliprange_value)."""
    loss = (values - returns) ** 2
    if clip_range is not None:
        clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
        loss = torch.max(loss, (clipped - returns) ** 2)
    return 0.5 * masked_mean(loss, mask)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[target - predicted] / Var[target] over valid positions (1 is perfect, <= 0 is useless)."""
    predicted, target, mask = predicted.double(), target.double(), mask.double()  # float64, as in masked_whiten
    target_var = masked_var(target, mask)
    if target_var.item() == 0:
        return float("nan")
    return float(1 - masked_var(target - predicted, mask) / target_var)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_samples: int) -> None:
        pass


class AdaptiveKLController:
    """Proportional controller on the observed KL to the reference (Ziegler et al. 2019, eq. 4):
    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_samples / horizon)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_samples / self.horizon


def kl_controller(init_kl_coef: float, target: float | None, horizon: int) -> FixedKLController | AdaptiveKLController:
    """The adaptive controller when a target is set, else a fixed coefficient."""
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon)
