import math

import pytest
import torch

from trpo_rlhf.trust_region import (
    backtracking_line_search,
    categorical_kl,
    cg_solve,
    conjugate_gradient,
    flat_concat,
    set_to_step,
    snapshot,
)


def random_spd(n, cond=50.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.logspace(0, math.log10(cond), n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


@pytest.mark.parametrize("n,seed", [(5, 0), (20, 1), (40, 2)])
def test_cg_solves_random_spd_systems(n, seed):
    A = random_spd(n, seed=seed)
    b = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 10))
    calls = []

    def fvp(v):
        calls.append(1)
        return A @ v

    x = conjugate_gradient(fvp, b, iters=3 * n, residual_tol=1e-20)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-8, atol=1e-10)
    assert len(calls) <= 3 * n


def test_cg_calls_fvp_once_per_iteration_and_stops_at_tolerance():
    A = random_spd(30, cond=1e3, seed=3)
    b = torch.randn(30, dtype=torch.float64)
    calls = []

    def fvp(v):
        calls.append(1)
        return A @ v

    loose = cg_solve(fvp, b, iters=100, residual_tol=1e-2)
    assert loose.iterations == len(calls)
    assert loose.residual < 1e-2
    residual = b - A @ loose.x
    assert torch.dot(residual, residual).item() == pytest.approx(loose.residual, rel=1e-6, abs=1e-12)
    # It stopped at the first iteration whose residual met the tolerance: one fewer had not.
    assert 1 < loose.iterations < 100
    assert cg_solve(A.__matmul__, b, iters=loose.iterations - 1, residual_tol=1e-2).residual > 1e-2
    calls.clear()
    tight = cg_solve(fvp, b, iters=100, residual_tol=1e-18)
    assert tight.iterations == len(calls)
    assert tight.iterations > loose.iterations
    # capped iterations: exactly `iters` products, even when not converged
    calls.clear()
    capped = cg_solve(fvp, b, iters=3, residual_tol=0.0)
    assert capped.iterations == 3 == len(calls)


@pytest.mark.parametrize("iters", [1, 3, 12])
def test_cg_reports_x_dot_ax_without_another_product(iters):
    # TRPO's step size needs x^T A x; CG's residual gives it exactly, converged or not.
    A = random_spd(25, cond=1e3, seed=4)
    b = torch.randn(25, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    result = cg_solve(lambda v: A @ v, b, iters=iters, residual_tol=0.0)
    assert result.x_ax == pytest.approx(torch.dot(result.x, A @ result.x).item(), rel=1e-9)


def test_cg_with_zero_rhs_uses_no_products():
    result = cg_solve(lambda v: pytest.fail("fvp must not be called"), torch.zeros(4), iters=10)
    assert result.iterations == 0 and torch.equal(result.x, torch.zeros(4))


def test_categorical_kl_is_exact():
    g = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(3, 4, 7, generator=g), torch.randn(3, 4, 7, generator=g)
    ours = categorical_kl(torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logits_p), torch.distributions.Categorical(logits=logits_q)
    )
    torch.testing.assert_close(ours, reference)


def quadratic_problem():
    """Parameters theta (two tensors); surrogate gain = g.(theta - theta0) - 0.5 |theta - theta0|^2,
    'KL' = 0.5 |theta - theta0|^2."""
    params = [torch.nn.Parameter(torch.tensor([1.0, -2.0])), torch.nn.Parameter(torch.tensor([[0.5]]))]
    origin = snapshot(params)
    g = torch.tensor([1.0, 1.0, 1.0])

    def evaluate():
        d = flat_concat(params).detach() - flat_concat(origin)
        return (g @ d - 0.5 * d @ d).item(), (0.5 * d @ d).item()

    return params, origin, g, evaluate


def test_line_search_accepts_first_point_inside_trust_region():
    params, origin, g, evaluate = quadratic_problem()
    step = g * 1.0  # KL at full step = 1.5, gain = 1.5
    result = backtracking_line_search(
        params,
        step,
        expected_gain=3.0,
        evaluate=evaluate,
        max_kl=0.5,
        kl_tolerance=1.0,
        backtrack_coef=0.5,
        max_backtracks=5,
        accept_ratio=0.1,
    )
    assert result.accepted and result.step_frac == 0.5 and result.iterations == 2
    assert result.kl == pytest.approx(0.5 * 0.25 * 3) and result.kl <= 0.5
    torch.testing.assert_close(flat_concat(params).detach(), flat_concat(origin) + 0.5 * step)


def test_line_search_restores_parameters_bitwise_when_rejected():
    params, origin, g, evaluate = quadratic_problem()
    bad_step = -g * 0.01  # moves against the gradient: never improves
    result = backtracking_line_search(
        params,
        bad_step,
        expected_gain=-0.03,
        evaluate=evaluate,
        max_kl=1.0,
        kl_tolerance=1.5,
        backtrack_coef=0.8,
        max_backtracks=4,
        accept_ratio=0.0,
    )
    assert not result.accepted and result.iterations == 4
    assert (result.step_frac, result.kl, result.surrogate_gain) == (0.0, 0.0, 0.0)
    assert all(torch.equal(p.detach(), o) for p, o in zip(params, origin))


def test_line_search_requires_fraction_of_expected_gain():
    params, origin, g, evaluate = quadratic_problem()
    step = g * 0.1  # gain = 0.285, linear prediction 0.3
    strict = backtracking_line_search(
        params,
        step,
        0.3,
        evaluate,
        max_kl=1.0,
        kl_tolerance=1.0,
        backtrack_coef=0.5,
        max_backtracks=1,
        accept_ratio=0.99,
    )
    assert not strict.accepted
    lenient = backtracking_line_search(
        params,
        step,
        0.3,
        evaluate,
        max_kl=1.0,
        kl_tolerance=1.0,
        backtrack_coef=0.5,
        max_backtracks=1,
        accept_ratio=0.9,
    )
    assert lenient.accepted


def test_line_search_restores_parameters_when_evaluation_raises():
    params, origin, g, _ = quadratic_problem()

    def broken():
        raise RuntimeError("forward failed")

    with pytest.raises(RuntimeError, match="forward failed"):
        backtracking_line_search(
            params, g, 1.0, broken, max_kl=1.0, kl_tolerance=1.0, backtrack_coef=0.5, max_backtracks=3, accept_ratio=0.0
        )
    assert all(torch.equal(p.detach(), o) for p, o in zip(params, origin))


def test_set_to_step_lays_out_flat_vector_like_flat_concat():
    params = [torch.zeros(2, 3), torch.zeros(4)]
    step = torch.arange(10, dtype=torch.float32)
    set_to_step(params, snapshot(params), step, 0.5)
    torch.testing.assert_close(flat_concat(params), 0.5 * step)


def test_fisher_vector_product_counts_its_calls():
    from trpo_rlhf.trust_region import fisher_vector_product

    theta = torch.nn.Parameter(torch.tensor([0.3, -0.2]))
    logits = torch.stack([theta[0], theta[1], torch.tensor(0.0)])
    logp = torch.log_softmax(logits, dim=-1)
    fvp = fisher_vector_product(categorical_kl(logp.detach(), logp), [theta], damping=0.0)
    p = logp.exp().detach()
    fisher = (torch.diag(p) - torch.outer(p, p))[:2, :2]  # J = [I | 0] for logits in theta
    for v in (torch.tensor([1.0, 0.0]), torch.tensor([0.5, -2.0])):
        torch.testing.assert_close(fvp(v), fisher @ v)
    assert fvp.calls == 2
