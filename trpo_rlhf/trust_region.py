"""The trust-region solver: flat-parameter helpers, conjugate gradient, Fisher-vector products,
the exact categorical KL and the backtracking line search (Schulman et al. 2015, Appendix C).

Everything here works on tensors and parameter lists; nothing knows about language models.

    >>> import torch
    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
    >>> b = torch.tensor([1.0, 2.0])
    >>> x = conjugate_gradient(lambda v: A @ v, b, iters=2)
    >>> torch.allclose(A @ x, b)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.autograd import forward_ad

Params = Sequence[torch.Tensor]
FVP_METHODS = ("gauss_newton", "kl_hessian")


def flat_concat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def split_like(flat: torch.Tensor, params: Params) -> list[torch.Tensor]:
    """The inverse of `flat_concat`: views of `flat` shaped like each parameter."""
    return [chunk.view_as(p) for chunk, p in zip(torch.split(flat, [p.numel() for p in params]), params)]


def flat_grad(
    output: torch.Tensor,
    params: Params,
    *,
    grad_outputs: torch.Tensor | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
) -> torch.Tensor:
    """d output / d params (or the vector-Jacobian product with `grad_outputs`) as one flat vector,
    zeros for parameters the output does not reach. As in `torch.autograd.grad`, the graph is kept
    when `create_graph` unless told otherwise."""
    grads = torch.autograd.grad(
        output,
        params,
        grad_outputs=grad_outputs,
        retain_graph=retain_graph,
        create_graph=create_graph,
        allow_unused=True,
    )
    return flat_grads_or_zeros(grads, params)


def flat_grads_or_zeros(grads: Sequence[torch.Tensor | None], params: Params) -> torch.Tensor:
    """`torch.autograd.grad(..., allow_unused=True)`'s result as one flat vector, zeros for the
    parameters it did not reach (None)."""
    return flat_concat([torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)])


def snapshot(params: Params) -> list[torch.Tensor]:
    """Copies of the parameter tensors, for an exact (bitwise) restore."""
    return [p.detach().clone() for p in params]


@torch.no_grad()
def restore(params: Params, saved: Sequence[torch.Tensor]) -> None:
    for p, s in zip(params, saved):
        p.copy_(s)


@torch.no_grad()
def set_to_step(params: Params, origin: Sequence[torch.Tensor], flat_step: torch.Tensor, frac: float) -> None:
    """theta = theta_origin + frac * step, the step being a flat vector laid out like `flat_concat(params)`."""
    for p, o, s in zip(params, origin, split_like(flat_step, params)):
        p.copy_(o + frac * s.to(p.dtype))


@dataclass
class CGResult:
    x: torch.Tensor
    residual: float  # squared norm of r = b - A x at exit
    iterations: int  # number of matrix-vector products used
    x_ax: float  # x . A x, from the residual CG keeps: x . (b - r), no further product needed


def cg_solve(
    fvp: Callable[[torch.Tensor], torch.Tensor],
    b: torch.Tensor,
    iters: int,
    residual_tol: float = 1e-10,
    first_product: torch.Tensor | None = None,
) -> CGResult:
    """Conjugate gradient for A x = b with A symmetric positive definite, given only v -> A v.

    Starts at x = 0, calls `fvp` once per iteration and stops early once r.r <= residual_tol, so
    at once for b = 0, whose solution is x = 0 (Schulman et al. 2015, Appendix C; Nocedal & Wright,
    Algorithm 5.2). `first_product`, A b when the caller has it already, is the first iteration's
    product (it counts as an iteration; `fvp` is not called for it).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    r_dot_r = torch.dot(r, r)
    iterations = 0
    for _ in range(iters):
        if r_dot_r.item() <= residual_tol:
            break
        Ap = first_product if iterations == 0 and first_product is not None else fvp(p)
        iterations += 1
        alpha = r_dot_r / torch.dot(p, Ap)
        x += alpha * p
        r -= alpha * Ap
        new_r_dot_r = torch.dot(r, r)
        p = r + (new_r_dot_r / r_dot_r) * p
        r_dot_r = new_r_dot_r
    return CGResult(x=x, residual=r_dot_r.item(), iterations=iterations, x_ax=torch.dot(x, b - r).item())


def cg_first_iterate(b: torch.Tensor, b_ab: float) -> CGResult:
    """CG's first iterate from x = 0 (`cg_solve` with one iteration), from the quadratic alone:
    x = (b.b / b^T A b) b. It needs b^T A b, not A b, so a caller that can form the quadratic more
    cheaply than a product (`logit_fisher_quadratic` on a forward-mode J b) saves the product; the
    residual, which would need A b, is not formed (NaN).

    >>> A, b = torch.tensor([[4.0, 1.0], [1.0, 3.0]]), torch.tensor([1.0, 2.0])
    >>> first = cg_first_iterate(b, torch.dot(b, A @ b).item())
    >>> torch.allclose(first.x, cg_solve(lambda v: A @ v, b, iters=1).x)
    True
    """
    if not b_ab > 0:  # b = 0: x = 0, where cg_solve would stop before its first product
        return CGResult(x=torch.zeros_like(b), residual=torch.dot(b, b).item(), iterations=0, x_ax=0.0)
    alpha = torch.dot(b, b).item() / b_ab
    return CGResult(x=alpha * b, residual=float("nan"), iterations=1, x_ax=alpha * alpha * b_ab)


def relative_damping(grad: torch.Tensor, fisher_grad: torch.Tensor, scale: float) -> float:
    """c = scale * g^T F g / g^T g: the damping as a share of the Fisher's curvature along the
    gradient (its Rayleigh quotient), so that (F + cI)^-1 g, and the step it gives, is the same
    whatever scale the parameters have. A reparametrisation theta = a * phi (LoRA's alpha / r, a
    model's width) multiplies F by a^2 and g by a, and c with them; an absolute c would act as a
    different damping on each (Martens 2010, sec. 4.1, damps relative to the curvature too).

    >>> g, F = torch.tensor([1.0, 0.0]), torch.tensor([[4.0, 0.0], [0.0, 1.0]])
    >>> relative_damping(g, F @ g, 0.1), relative_damping(10 * g, 100 * F @ (10 * g), 0.1)
    (0.4, 40.0)
    """
    grad_sq = torch.dot(grad, grad).item()
    return scale * torch.dot(grad, fisher_grad).item() / grad_sq if grad_sq > 0 else 0.0


def conjugate_gradient(
    fvp: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int, residual_tol: float = 1e-10
) -> torch.Tensor:
    """x ~ A^{-1} b by conjugate gradient; see `cg_solve` for the residual and iteration count."""
    return cg_solve(fvp, b, iters, residual_tol).x


KL_CHUNK_POSITIONS = 64  # positions per chunk of the no-grad KL: [64, V] temporaries, ~12 MB at V = 49k


def categorical_kl(logp: torch.Tensor, logq: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """KL(p || q) = sum_a p(a) (log p(a) - log q(a)) over the last (vocabulary) dimension, exact.

    Takes log-probabilities; returns one KL per position. With `chunk_size`, the positions are
    processed that many at a time, so the temporaries are [chunk_size, V] rather than three copies
    of the whole [..., V] input (for passes without a graph).
    """
    if chunk_size is None:
        return (logp.exp() * (logp - logq)).sum(dim=-1)
    flat_p, flat_q = logp.reshape(-1, logp.shape[-1]), logq.reshape(-1, logq.shape[-1])
    kl = torch.cat([categorical_kl(a, b) for a, b in zip(flat_p.split(chunk_size), flat_q.split(chunk_size))])
    return kl.view(logp.shape[:-1])


def fisher_vector_product(
    mean_kl: torch.Tensor,
    params: Params,
    damping: float,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (F + damping I) v with F the Hessian of the mean KL(pi_old || pi_theta) at theta_old.

    `mean_kl` must be KL(stop_grad(pi_theta) || pi_theta), built with a graph at theta_old: its value
    and gradient are 0 there and its Hessian is the Fisher information matrix (Schulman et al. 2015,
    Appendix C.1). The gradient graph is built once here (create_graph) and every product is one more
    backward through it: F v = d/dtheta (grad KL . v). `reduce` averages across processes.
    The returned callable counts its calls in `.calls`.
    """
    kl_grad = flat_grad(mean_kl, params, create_graph=True)

    def fisher_product(v: torch.Tensor) -> torch.Tensor:
        grad_dot_v = torch.dot(kl_grad, v.to(kl_grad.dtype))
        return flat_grad(grad_dot_v, params, retain_graph=True)

    return DampedFisherProduct(fisher_product, damping, reduce)


def logit_fisher_quadratic(logits: torch.Tensor, tangent: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """v^T F v = sum_n w_n t_n^T (diag(p_n) - p_n p_n^T) t_n, with t = J v the logits' directional
    derivative (`tangent`, e.g. from `forward_tangents`), p = softmax(`logits`) and `weights` [...]
    each position's weight (1/number of valid tokens for the mean KL): the Gauss-Newton form of the
    Fisher quadratic (`gauss_newton_fvp`) without its backward pass, in float32.

    >>> logits, tangent = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]])   # p = (1/2, 1/2)
    >>> logit_fisher_quadratic(logits, tangent, torch.ones(1))             # 1/2 + 1/2 - 0^2
    tensor(1.)
    """
    probs = torch.softmax(logits.float(), dim=-1)
    tangent = tangent.float()
    mean_tangent = (probs * tangent).sum(dim=-1)
    per_position = (probs * tangent.square()).sum(dim=-1) - mean_tangent.square()
    return (weights.to(per_position.dtype) * per_position).sum()


@contextlib.contextmanager
def forward_tangents(module: torch.nn.Module, params: Params, tangent: torch.Tensor) -> Iterator[None]:
    """Inside, each of `params` (tensors of `module`) carries its part of the flat `tangent` as a
    forward-mode tangent (torch.autograd.forward_ad), so a forward of `module` computes beside
    each output its directional derivative J v: `forward_ad.unpack_dual(output).tangent`. No graph
    is kept (run it under `torch.no_grad()`): a Jacobian-vector product for about two forwards'
    work and one forward's memory. The parameters are put back on exit.
    """
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for owner in module.modules():
        for name, param in owner._parameters.items():
            if param is not None:
                owners.setdefault(id(param), []).append((owner, name))
    swapped: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    with forward_ad.dual_level():
        try:
            for param, part in zip(params, split_like(tangent, params)):
                if id(param) not in owners:
                    raise ValueError(
                        f"a tensor of shape {tuple(param.shape)} in params is not a parameter of the module."
                    )
                dual = forward_ad.make_dual(param.detach(), part.to(param.dtype))
                for owner, name in owners[id(param)]:
                    # Into the module's own parameter slot: a dual tensor is not a Parameter,
                    # which Module.__setattr__ would refuse.
                    owner._parameters[name] = dual
                    swapped.append((owner, name, param))
            yield
        finally:
            for owner, name, param in swapped:
                owner._parameters[name] = param


class DampedFisherProduct:
    """v -> reduce(F v) + damping * v, in float32, counting its calls in `calls`; `F v` is either
    form's product on this process (`reduce` averages it across processes).

    A class rather than an attribute on the closure: a closure that refers to itself is a
    reference cycle, which keeps the graph it holds (gigabytes for an LLM) alive after `del` until
    Python's cyclic collector happens to run.
    """

    def __init__(
        self,
        fisher_product: Callable[[torch.Tensor], torch.Tensor],
        damping: float,
        reduce: Callable[[torch.Tensor], torch.Tensor],
    ):
        self.fisher_product, self.damping, self.reduce = fisher_product, damping, reduce
        self.calls = 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.undamped(v) + self.damping * v

    def undamped(self, v: torch.Tensor) -> torch.Tensor:
        """F v alone (averaged across processes), counted as a call."""
        self.calls += 1
        return self.reduce(self.fisher_product(v).float())


class LinearizedLogits:
    """The Jacobian J = d logits / d theta at theta_old, applied by passes over retained graphs:
    `jvp(v)` = J v and `vjp(w)` = J^T w, both flat over `params`.

    J v is the derivative in u of the linear map u -> J^T u, whose graph is built once here (one
    backward with create_graph) at u = `at` (zeros by default) and then reused by every `jvp`. Its
    value there, `vjp_at` = J^T at, comes with the build: given at = dL/dlogits it is the gradient
    of L, so an update that needs both g and the Fisher pays one backward for the two.

        >>> theta = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> logits = torch.stack([theta[0] * theta[1], 3 * theta[1]])     # J = [[2, 1], [0, 3]]
        >>> jac = LinearizedLogits(logits, [theta], at=torch.tensor([1.0, 1.0]))
        >>> jac.jvp(torch.tensor([1.0, 0.0])).tolist(), jac.vjp_at.tolist()
        ([2.0, 0.0], [2.0, 4.0])
    """

    def __init__(self, logits: torch.Tensor, params: Params, at: torch.Tensor | None = None):
        self.logits, self.params = logits, list(params)
        self._u = (torch.zeros_like(logits) if at is None else at.detach().to(logits.dtype)).requires_grad_()
        jt_u = torch.autograd.grad(logits, self.params, grad_outputs=self._u, create_graph=True, allow_unused=True)
        self._reached = [i for i, g in enumerate(jt_u) if g is not None]  # J v ignores v on unreached tensors
        self._jt_u = [jt_u[i] for i in self._reached]
        self.vjp_at = flat_grads_or_zeros(jt_u, self.params).detach()

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """J v, shaped like the logits."""
        v_parts = split_like(v, self.params)
        (jv,) = torch.autograd.grad(
            self._jt_u,
            self._u,
            grad_outputs=[v_parts[i].to(g.dtype) for i, g in zip(self._reached, self._jt_u)],
            retain_graph=True,
        )
        return jv

    def vjp(self, w: torch.Tensor) -> torch.Tensor:
        """J^T w, flat; `w` is shaped like the logits."""
        return flat_grad(self.logits, self.params, grad_outputs=w.to(self.logits.dtype), retain_graph=True)


def gauss_newton_fvp(
    jacobian: LinearizedLogits,
    weights: torch.Tensor,
    damping: float,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> DampedFisherProduct:
    """v -> (F + damping I) v with F = J^T M J, the Fisher of the weighted KL(pi_old || pi_theta)
    at theta_old in its Gauss-Newton form (Martens 2014; Schraudolph 2002).

    `jacobian` linearizes the policy's (temperature-scaled) logits [..., V] at theta_old;
    `weights` [...] weigh each position (1/number of valid tokens for the mean KL, 0 for padding).
    M = sum_n w_n (diag(p_n) - p_n p_n^T) is the Hessian of the KL in the logits, p = softmax(logits).
    This is exactly the Hessian of the mean KL at theta_old: the other term of that Hessian,
    sum (dKL/dlogits) d^2 logits/dtheta^2, vanishes there because dKL/dlogits = p_theta - p_old = 0.
    The double-backward form (`fisher_vector_product`) still pays for that zero term through every
    layer; this one does not. Each product is two passes over the retained graphs: J v, then
    J^T (M J v). The returned callable counts its calls in `.calls`.
    """
    probs = torch.softmax(jacobian.logits.detach().float(), dim=-1)
    weights = weights.to(probs.dtype).unsqueeze(-1)

    def fisher_product(v: torch.Tensor) -> torch.Tensor:
        jv = jacobian.jvp(v).float()
        # (diag(p) - p p^T) Jv per position, weighted, in float32 whatever the model's dtype.
        return jacobian.vjp(weights * probs * (jv - (probs * jv).sum(dim=-1, keepdim=True)))

    return DampedFisherProduct(fisher_product, damping, reduce)


def kl_fisher_product(
    logits: torch.Tensor,
    mask: torch.Tensor,
    params: Params,
    *,
    method: str,
    damping: float,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    jacobian: LinearizedLogits | None = None,
) -> DampedFisherProduct:
    """v -> (F + damping I) v, F the Fisher of the mean over `mask`ed positions of
    KL(pi_old || pi_theta) at theta_old, for the policy whose `logits` (with their graph) are given.
    Its graph is built here, once, and every product reuses it.

    `method` "gauss_newton" (`gauss_newton_fvp`, reusing a `jacobian` already built on these logits)
    or "kl_hessian" (`fisher_vector_product`, double backward through the KL gradient): the same
    matrix.
    """
    if method not in FVP_METHODS:
        raise ValueError(f"method={method!r} is not one of {FVP_METHODS}.")
    if method == "gauss_newton":
        jacobian = jacobian or LinearizedLogits(logits, params)
        return gauss_newton_fvp(jacobian, mask / mask.sum().clamp(min=1), damping, reduce=reduce)
    logp = torch.log_softmax(logits, dim=-1)
    # KL(stop_grad(pi) || pi): zero value and gradient at theta_old, Hessian = Fisher.
    kl = categorical_kl(logp.detach(), logp)
    mean_kl = (kl * mask).sum() / mask.sum().clamp(min=1)
    return fisher_vector_product(mean_kl, params, damping, reduce=reduce)


def surrogate_gradient(
    surrogate: torch.Tensor, logits: torch.Tensor, params: Params, *, linearize: bool, retain_graph: bool = False
) -> tuple[torch.Tensor, LinearizedLogits | None]:
    """g = d surrogate / d params, with the `logits` the surrogate was computed from.

    With `linearize`, g comes as the value of the Gauss-Newton Fisher's graph built at
    u = d surrogate / d logits (`LinearizedLogits(..., at=u)`), returned for `kl_fisher_product` to
    reuse: one backward serves the gradient and the Fisher. Otherwise a plain backward, keeping the
    graph when `retain_graph` (a double-backward Fisher on the same forward)."""
    if linearize:
        (surrogate_logits_grad,) = torch.autograd.grad(surrogate, logits)
        jacobian = LinearizedLogits(logits, params, at=surrogate_logits_grad)
        return jacobian.vjp_at, jacobian
    return flat_grad(surrogate, params, retain_graph=retain_graph), None


@dataclass
class LineSearchResult:
    accepted: bool
    step_frac: float  # alpha^j of the accepted point, 0 when rejected
    kl: float  # measured mean KL(pi_old || pi_new) of the accepted point, 0 when rejected
    surrogate_gain: float  # L(theta_new) - L(theta_old) of the accepted point, 0 when rejected
    iterations: int  # points evaluated


def backtracking_line_search(
    params: Params,
    full_step: torch.Tensor,
    expected_gain: float,
    evaluate: Callable[[], tuple[float, float]],
    *,
    max_kl: float,
    kl_tolerance: float,
    backtrack_coef: float,
    max_backtracks: int,
    accept_ratio: float,
) -> LineSearchResult:
    """Try theta_old + alpha^j * full_step for j = 0, 1, ...; keep the first point whose measured
    KL <= kl_tolerance * max_kl and whose surrogate improves by > 0 and by at least
    accept_ratio * alpha^j * expected_gain (Schulman et al. 2015, Appendix C).

    `evaluate()` is called with the parameters set to the candidate and returns
    (surrogate gain over theta_old, mean KL from pi_old). If no point is accepted, or anything
    raises, the parameters are restored bitwise to theta_old.
    """
    origin = snapshot(params)
    accepted = False
    try:
        for j in range(max_backtracks):
            frac = backtrack_coef**j
            set_to_step(params, origin, full_step, frac)
            gain, kl = evaluate()
            finite = torch.isfinite(torch.tensor([gain, kl])).all().item()
            if finite and kl <= kl_tolerance * max_kl and gain > 0 and gain >= accept_ratio * frac * expected_gain:
                accepted = True
                return LineSearchResult(True, frac, kl, gain, j + 1)
        return LineSearchResult(False, 0.0, 0.0, 0.0, max_backtracks)
    finally:
        if not accepted:
            restore(params, origin)
