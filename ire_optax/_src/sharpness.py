"""Sharpness measurements: Hessian spectra, traces, diagonals and SAM sharpness.

Pure, jittable functions over any loss ``loss_fn(params, batch) -> scalar`` and
any parameter pytree. The batch is an *argument* (any pytree, or ``None``), not
a closure, so one compiled function serves every batch::

  eigs = jax.jit(functools.partial(top_hessian_eigs, loss_fn, k=2, num_iters=20))
  vals, vecs = eigs(params, batch, key=key)   # re-used for every batch

Integer settings (``k``, ``num_iters``, ``num_samples``, ``num_steps``,
``num_microbatches``) and ``method`` are keyword-only and must be static
(bind them with :func:`functools.partial` or ``static_argnames``).

Conventions:

* Parameters may be bfloat16/float16: they are cast to float32 on entry and
  every result is float32. ``loss_fn`` is called with float32 parameters.
* Random functions take a PRNG ``key``; the same key gives the same answer
  under ``jit``, on one device or with parameters sharded over many
  (``jax.sharding.NamedSharding``), up to float reduction order.
* Every Hessian-vector product (HVP) is forward-over-reverse
  (``jax.jvp`` of ``jax.grad``), about 2-3x the cost of one gradient.
* Repeated HVPs/gradients run in a rolled ``lax.fori_loop``/``lax.scan``
  (fast to compile; the best choice on GPU/TPU). On CPU, XLA runs
  convolutions inside loop bodies several times slower (jax-ml/jax#12868):
  pass ``unroll=True`` there (longer compile, loop-free program).

Cost per call, in HVPs (``n`` = number of parameters):

=============================  ======================================  ===================
function                       HVPs / gradients                        extra memory
=============================  ======================================  ===================
``hvp``                        1 HVP                                   --
``top_hessian_eigs`` Lanczos   ``min(num_iters, n)`` HVPs              ``num_iters * n``
``top_hessian_eigs`` power     ``k * num_iters`` HVPs                  ``k * n``
``hessian_trace``              ``num_samples`` HVPs (sequential)       --
``hessian_diagonal``           hutchinson: ``num_samples`` HVPs;
                               fisher: ``num_samples`` gradients;
                               grad_sq: 1 gradient                     --
``sam_sharpness``              ``num_steps`` gradients + 1 loss        --
``m_sharpness``                ``num_steps`` gradients + 1 loss per
                               micro-batch (vmapped)                   ``m`` perturbations
=============================  ======================================  ===================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from ire_optax._src import estimators, sam, selection, sharding, utils

Params = Any
Batch = Any
LossFn = Callable[[Params, Batch], jax.Array]

_NORM_EPS = 1e-12  # added to every normalising norm, so zero gradients never give NaN.
_BREAKDOWN_TOL = 1e-6  # Lanczos: beta <= tol * ||H|| (estimate) means an invariant subspace.


# -----------------------------------------------------------------------------
# Validation and small helpers
# -----------------------------------------------------------------------------


def _f32(tree: Any, what: str = "params") -> Any:
  """``tree`` in float32; raises unless every leaf is a real floating array (an integer
  leaf would otherwise become a coordinate of the Hessian)."""
  utils.check_float_tree(
      tree, what=what, who="ire_optax.sharpness",
      hint=" The Hessian is taken with respect to every leaf: pass the floating parameters "
           "only (e.g. nnx.split(model, nnx.Param, ...)) and close over the rest in `loss_fn`.")
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _check_unroll(unroll: Any) -> int | bool:
  if isinstance(unroll, bool):
    return unroll
  return utils.check_static_int("unroll", unroll)


def _check_key(key: Any) -> None:
  """``key`` must be one PRNG key: ``jax.random.key(seed)`` or a raw ``uint32[2]``."""
  dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ():
    return
  if dtype == jnp.uint32 and shape == (2,):
    return
  raise TypeError(
      "`key` must be one PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)); got "
      f"{type(key).__name__}" + (f" of dtype {dtype} and shape {shape}." if dtype else "."))


def _check_loss(loss_fn: Any, params32: Params, batch: Batch) -> None:
  """Raises unless ``loss_fn(params, batch)`` returns one real scalar."""
  if not callable(loss_fn):
    raise TypeError(f"`loss_fn` must be callable; got {type(loss_fn).__name__}.")
  out = jax.eval_shape(loss_fn, params32, batch)
  if not hasattr(out, "shape"):  # a container, even of one scalar
    raise ValueError(
        "loss_fn must return a scalar, got a pytree "
        f"{jax.tree.structure(out)} (return only the loss, e.g. drop auxiliary outputs)."
    )
  if out.shape != ():
    raise ValueError(
        f"loss_fn must return a scalar, got shape {out.shape} "
        "(reduce it, e.g. with jnp.mean, before calling)."
    )
  if not jnp.issubdtype(out.dtype, jnp.floating):
    raise ValueError(f"loss_fn must return a real floating scalar, got dtype {out.dtype}.")


def _scalar_loss(loss_fn: LossFn, batch: Batch) -> Callable[[Params], jax.Array]:
  return lambda p: jnp.asarray(loss_fn(p, batch), jnp.float32)


def _grad_fn(loss_fn: LossFn, batch: Batch) -> Callable[[Params], Any]:
  return jax.grad(_scalar_loss(loss_fn, batch))


def _tree_vdot(a: Any, b: Any) -> jax.Array:
  """Sum over leaves of ``<a, b>`` in float32."""
  # A sum of products, not jnp.vdot, which flattens: an explicitly sharded leaf split along
  # any axis but its first cannot be reshaped.
  leaves = [jnp.sum(jnp.asarray(x, jnp.float32) * jnp.asarray(y, jnp.float32))
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
  return sum(leaves, jnp.zeros((), jnp.float32))


def _prepare(loss_fn: LossFn, params: Params, batch: Batch) -> Params:
  params32 = _f32(params)
  _check_loss(loss_fn, params32, batch)
  return params32


def _flat_hvp(loss_fn: LossFn, params32: Params, batch: Batch):
  """``(x0, unravel, matvec)``: flat float32 params and ``x -> H x`` on flat vectors.

  Under GSPMD (``jax.jit`` with sharded arrays) the compiler places the flat
  vectors. With explicit-mode sharding the flat vectors are kept replicated
  and each tangent is resharded like its parameter before the HVP.
  """
  def ravel(tree):  # each leaf replicated first: leaves sharded differently cannot be joined
    return ravel_pytree(jax.tree.map(
        lambda t: sharding.reshard(t, jax.sharding.PartitionSpec()), tree))

  flat, unravel = ravel(params32)
  grad_fn = _grad_fn(loss_fn, batch)

  def to_tree(x):
    return jax.tree.map(lambda t, p: sharding.reshard(t, sharding.spec(p))
                        if sharding.explicit_sharding(p) is not None else t, unravel(x), params32)

  def matvec(x):
    return ravel(estimators.hvp(grad_fn, params32, to_tree(x)))[0]

  return flat, to_tree, matvec


# -----------------------------------------------------------------------------
# Hessian-vector products
# -----------------------------------------------------------------------------


def hvp(loss_fn: LossFn, params: Params, batch: Batch, v: Params) -> Params:
  r"""Hessian-vector product :math:`H v`, :math:`H = \nabla^2_\theta L(\theta; B)`.

  Computed exactly (no finite differences) by forward-over-reverse
  differentiation, :math:`H v = \partial_t \nabla L(\theta + t v)|_{t=0}`
  (Pearlmutter, 1994), at about 2-3x the cost of one gradient.

  Args:
    loss_fn: ``(params, batch) -> scalar loss``.
    params: the point :math:`\theta` (any pytree; bfloat16 allowed).
    batch: the data passed to ``loss_fn`` (any pytree, or ``None``).
    v: a pytree with the structure and shapes of ``params``.

  Returns:
    :math:`H v`, float32, with the structure of ``params``.

  Example:
    >>> import jax.numpy as jnp
    >>> import ire_optax.sharpness as sh
    >>> loss = lambda p, b: jnp.sum(b * p["w"] ** 2)
    >>> p = {"w": jnp.array([1.0, 2.0])}
    >>> sh.hvp(loss, p, jnp.array([1.0, 3.0]), {"w": jnp.ones(2)})["w"]
    Array([2., 6.], dtype=float32)
  """
  params32 = _prepare(loss_fn, params, batch)
  if jax.tree.structure(v) != jax.tree.structure(params) or any(  # type: ignore[operator]
      jnp.shape(a) != jnp.shape(b)
      for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(params), strict=True)):
    raise ValueError("`v` must have the tree structure and shapes of `params`; got "
                     f"{jax.tree.map(jnp.shape, v)} for params {jax.tree.map(jnp.shape, params)}.")
  return estimators.hvp(_grad_fn(loss_fn, batch), params32, _f32(v, "v"))


# -----------------------------------------------------------------------------
# Top Hessian eigenpairs
# -----------------------------------------------------------------------------


def _project_out(basis: jax.Array, w: jax.Array) -> jax.Array:
  """``w - V^T V w`` for the rows ``V`` of ``basis`` (one classical Gram-Schmidt pass).

  Written as ``(V w) @ V`` rather than ``V.T @ (V w)``: XLA:CPU would
  otherwise materialise the transpose of the whole basis on every call.
  """
  return w - (basis @ w) @ basis


def _orthogonalize(basis: jax.Array, w: jax.Array) -> jax.Array:
  """Removes from ``w`` its components along the rows of ``basis`` (twice: CGS2)."""
  return _project_out(basis, _project_out(basis, w))


def _lanczos(matvec, v0: jax.Array, key: jax.Array, m: int, reorthogonalize: bool,
             unroll: int | bool):
  """``m`` Lanczos steps; returns the tridiagonal ``T`` (m, m) and basis ``V`` (m, n).

  Each step subtracts the three-term recurrence and then (``reorthogonalize``)
  one classical Gram-Schmidt pass against every basis vector, which removes the
  rounding-level components the recurrence leaves (they are O(eps ||H||), so
  one pass brings them to O(eps^2)). Cost per step: one HVP and two reads of
  the basis.
  """
  n = v0.shape[0]
  zero = jnp.zeros((), jnp.float32)
  basis = jnp.zeros((m + 1, n), jnp.float32).at[0].set(v0)
  alphas = jnp.zeros((m,), jnp.float32)
  betas = jnp.zeros((m,), jnp.float32)

  def body(i, carry):
    basis, v_prev, v, beta_prev, alphas, betas, scale = carry
    w = matvec(v)
    alpha = jnp.vdot(v, w)
    w = w - alpha * v - beta_prev * v_prev
    if reorthogonalize:
      # Rows > i of `basis` are zero, so this projects on span(v_0..v_i).
      w = _project_out(basis, w)
    beta = utils.tree_norm(w)  # scaled: entries below ~1e-19 or above ~1e19 square finely
    # max |alpha_j|, beta_j is a lower bound on ||H||: beta below a tiny fraction
    # of it means the Krylov space is (numerically) invariant.
    scale = jnp.maximum(scale, jnp.abs(alpha))
    breakdown = beta <= _BREAKDOWN_TOL * scale
    scale = jnp.maximum(scale, beta)

    def restart(_):
      # Invariant subspace found: continue with a fresh random direction
      # orthogonal to the basis; T gets a zero off-diagonal (block diagonal).
      r = jax.random.normal(jax.random.fold_in(key, i), (n,), jnp.float32)
      r = _orthogonalize(basis, r)
      return _unit(r), zero

    def proceed(_):
      return w / beta, beta

    v_next, beta = jax.lax.cond(breakdown, restart, proceed, None)
    basis = basis.at[i + 1].set(v_next)
    return basis, v, v_next, beta, alphas.at[i].set(alpha), betas.at[i].set(beta), scale

  init = (basis, jnp.zeros_like(v0), v0, zero, alphas, betas, zero)
  basis, _, _, _, alphas, betas, _ = jax.lax.fori_loop(0, m, body, init, unroll=unroll)
  off = betas[: m - 1]
  tri = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
  return tri, basis[:m]


def _unit(x: jax.Array) -> jax.Array:
  """``x / ||x||`` with a scaled norm (no under- or overflow in its squares); 0 stays 0."""
  norm = utils.tree_norm(x)
  return x / jnp.where(norm > 0, norm, 1)


def _power(matvec, n: int, key: jax.Array, k: int, num_iters: int, unroll: int | bool):
  """Power iteration with projection deflation; ``k`` pairs of largest |eigenvalue|."""
  vecs = jnp.zeros((k, n), jnp.float32)
  vals = jnp.zeros((k,), jnp.float32)
  for j in range(k):  # k is small: a Python loop keeps each pair's loop at the top level
    v = jax.random.normal(jax.random.fold_in(key, j), (n,), jnp.float32)
    v = _orthogonalize(vecs, v)  # rows >= j are still zero
    v = _unit(v)

    def step(_, state, found=vecs):
      v = state[0]
      w = _orthogonalize(found, matvec(v))  # (I - U U^T) H (I - U U^T) v
      # The Rayleigh quotient of the unit vector v, returned with v itself (not with the
      # next iterate, whose quotient would take one more HVP).
      return _unit(w), v, jnp.vdot(v, w)

    _, v, lam = jax.lax.fori_loop(0, num_iters, step, (v, v, jnp.zeros((), jnp.float32)),
                                  unroll=unroll)
    vecs, vals = vecs.at[j].set(v), vals.at[j].set(lam)
  return vals, vecs


def top_hessian_eigs(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    key: jax.Array,
    k: int = 1,
    num_iters: int = 20,
    method: str = "lanczos",
    reorthogonalize: bool = True,
    unroll: int | bool = 1,
) -> tuple[jax.Array, Params]:
  r"""The ``k`` largest Hessian eigenvalues and their eigenvectors.

  ``method="lanczos"`` (default) runs :math:`m = \min(\text{num\_iters}, n)`
  Lanczos steps from a random unit vector :math:`v_0`:
  :math:`w = H v_i`, :math:`\alpha_i = v_i^\top w`, :math:`w \leftarrow w -
  \alpha_i v_i - \beta_{i-1} v_{i-1}`, then :math:`w \leftarrow w - V_i V_i^\top w`
  (full reorthogonalisation: one Gram-Schmidt pass against all previous
  vectors), :math:`\beta_i = \|w\|`, :math:`v_{i+1} = w / \beta_i`. The
  eigenvalues of the tridiagonal :math:`T = \operatorname{tridiag}(\beta,
  \alpha, \beta)` (Ritz values, by ``jnp.linalg.eigh``) approximate the
  extreme eigenvalues of :math:`H`; the top ``k`` are returned, largest
  first, with Ritz vectors :math:`V s`. If the Krylov space becomes invariant
  (:math:`\beta_i \approx 0`) the iteration continues from a fresh random
  orthogonal direction. With ``num_iters >= n`` the answer is exact up to
  rounding. The largest Ritz values converge first: with ``num_iters`` close to
  ``k`` the lower ones are not converged (on a 1,970-parameter model, ``k=20``
  and ``num_iters=20`` gave 10 of the 20 wrong by more than 0.1%, ``num_iters=40``
  2); take ``num_iters >= 2k + 10``, or check a pair's residual
  :math:`\|Hv - \lambda v\|` with :func:`hvp`. Cost: ``m`` HVPs and an ``m x n``
  float32 basis, written once and (with reorthogonalisation) read twice per
  step. Under ``jit``, unused eigenvectors are dead code:
  ``top_hessian_eigs(...)[0]`` skips forming them.

  ``method="power"`` runs ``num_iters`` steps of power iteration for each of
  the ``k`` pairs, deflating the pairs already found by projection
  (:math:`v \leftarrow (I - UU^\top) H (I - UU^\top) v`). It needs no basis but
  converges at the rate :math:`|\lambda_{j+1}/\lambda_j|` and finds the
  eigenvalues of largest *magnitude* (near a minimum these are the largest
  ones); they are returned sorted by value, each the Rayleigh quotient
  :math:`v^\top H v` of the returned vector. Nothing signals non-convergence:
  where :math:`\lambda_{\min} \approx -\lambda_{\max}` (at a saddle) the
  iterate oscillates and the quotient is no eigenvalue; use Lanczos there.
  Cost: ``k * num_iters`` HVPs.

  References:
    Lanczos, *An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators*, 1950; Golub & Van Loan,
    *Matrix Computations*, §10.1; Yao et al., *PyHessian: Neural Networks
    Through the Lens of the Hessian*, 2020.

  Args:
    loss_fn: ``(params, batch) -> scalar loss``.
    params: where the Hessian is taken (any pytree; bfloat16 allowed).
    batch: the data passed to ``loss_fn`` (any pytree, or ``None``).
    key: PRNG key for the starting vector(s).
    k: number of eigenpairs, ``1 <= k <= n`` (static).
    num_iters: Lanczos steps (``>= k``), or power steps per pair (static).
    method: ``"lanczos"`` or ``"power"``.
    reorthogonalize: Lanczos only. ``False`` uses the plain three-term
      recurrence (less work per step, but rounding creates spurious copies of
      converged eigenvalues; use only with ``k=1``).
    unroll: loop unrolling passed to ``lax.fori_loop`` (static; ``True``
      unrolls fully). Rolled loops (the default) compile fastest; on CPU,
      convolutions inside a rolled loop run several times slower (XLA:CPU,
      jax-ml/jax#12868), so ``unroll=True`` pays off for convnets there.

  Returns:
    ``(eigenvalues, eigenvectors)``: float32 eigenvalues of shape ``(k,)`` in
    descending order, and unit-norm eigenvectors as a pytree like ``params``
    with a leading axis of size ``k`` (``jax.tree.map(lambda x: x[i], vecs)``
    is the ``i``-th vector).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import ire_optax.sharpness as sh
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)   # H = diag(b)
    >>> vals, vecs = sh.top_hessian_eigs(loss, jnp.zeros(4), jnp.array([1., 4., 2., 3.]),
    ...                                  key=jax.random.key(0), k=2, num_iters=4)
    >>> [round(float(x), 4) for x in vals]
    [4.0, 3.0]
  """
  utils.check_choice("method", method, ("lanczos", "power"))
  _check_key(key)
  utils.check_bool("reorthogonalize", reorthogonalize)
  unroll = _check_unroll(unroll)
  k = utils.check_static_int("k", k)
  num_iters = utils.check_static_int("num_iters", num_iters)
  n = selection.num_elements(params)
  if k > n:
    raise ValueError(f"`k` must be in [1, {n}] (the number of parameters); got {k}.")
  if method == "lanczos" and num_iters < k:
    raise ValueError(
        f"`num_iters` must be >= k={k} for Lanczos (it finds at most num_iters "
        f"eigenvalues); got {num_iters}."
    )
  params32 = _prepare(loss_fn, params, batch)
  _, unravel, matvec = _flat_hvp(loss_fn, params32, batch)
  if method == "lanczos":
    m = min(num_iters, n)
    key_start, key_restart = jax.random.split(key)
    v0 = jax.random.normal(key_start, (n,), jnp.float32)
    v0 = v0 / (jnp.linalg.norm(v0) + _NORM_EPS)
    tri, basis = _lanczos(matvec, v0, key_restart, m, reorthogonalize, unroll)
    ritz_vals, ritz_vecs = jnp.linalg.eigh(tri)  # ascending
    vals = ritz_vals[::-1][:k]
    vecs = ritz_vecs[:, ::-1][:, :k].T @ basis  # (k, n) Ritz vectors
    vecs = vecs / (jnp.linalg.norm(vecs, axis=1, keepdims=True) + _NORM_EPS)
  else:
    vals, vecs = _power(matvec, n, key, k, num_iters, unroll)
    order = jnp.argsort(-vals)
    vals, vecs = vals[order], vecs[order]
  return vals, jax.vmap(unravel)(vecs)


# -----------------------------------------------------------------------------
# Trace and diagonal
# -----------------------------------------------------------------------------


def hessian_trace(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    key: jax.Array,
    num_samples: int = 10,
    unroll: int | bool = 1,
) -> tuple[jax.Array, jax.Array]:
  r"""Hutchinson's estimate of :math:`\operatorname{tr} H` with its standard error.

  :math:`\widehat{\operatorname{tr}} = \frac1S \sum_{s=1}^S z_s^\top H z_s` with
  Rademacher probes :math:`z_s \in \{\pm 1\}^n` (unbiased; the variance of one
  sample is :math:`2\sum_{i\ne j} H_{ij}^2`). The standard error is the
  sample standard deviation over :math:`\sqrt S` (NaN when ``num_samples=1``).
  The probes are evaluated one after the other (``lax.scan``), so memory does
  not grow with ``num_samples``. Cost: ``num_samples`` HVPs.

  References:
    Hutchinson, *A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines*, 1989; Avron & Toledo, 2011.

  Args:
    loss_fn: ``(params, batch) -> scalar loss``.
    params: where the Hessian is taken (any pytree; bfloat16 allowed).
    batch: the data passed to ``loss_fn`` (any pytree, or ``None``).
    key: PRNG key for the probes.
    num_samples: number of probes ``S >= 1`` (static).
    unroll: loop unrolling of the scan over probes (static; see
      :func:`top_hessian_eigs`).

  Returns:
    ``(estimate, standard_error)``, float32 scalars.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import ire_optax.sharpness as sh
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)   # H = diag(b): z^T H z = tr H
    >>> est, se = sh.hessian_trace(loss, jnp.zeros(3), jnp.array([1., 2., 3.]),
    ...                            key=jax.random.key(0), num_samples=4)
    >>> float(est), float(se)
    (6.0, 0.0)
  """
  num_samples = utils.check_static_int("num_samples", num_samples)
  _check_key(key)
  unroll = _check_unroll(unroll)
  params32 = _prepare(loss_fn, params, batch)
  grad_fn = _grad_fn(loss_fn, batch)

  def one(_, k):
    z = estimators.rademacher_like(k, params32)
    return None, _tree_vdot(z, estimators.hvp(grad_fn, params32, z))

  _, samples = jax.lax.scan(one, None, jax.random.split(key, num_samples), unroll=unroll)
  estimate = jnp.mean(samples)
  if num_samples == 1:
    return estimate, jnp.full((), jnp.nan, jnp.float32)
  se = jnp.std(samples, ddof=1) / jnp.sqrt(jnp.float32(num_samples))
  return estimate, se


def hessian_diagonal(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    key: jax.Array | None = None,
    method: str = "hutchinson",
    num_samples: int = 1,
    logits_fn: Callable[[Params, Batch], jax.Array] | None = None,
) -> Params:
  r"""The Hessian-diagonal estimates that IRE ranks coordinates by.

  Exactly the estimators of :func:`ire_optax.ire`'s ``curvature=`` option
  (``ire_optax._src.estimators``), so you can inspect what IRE calls flat:

  * ``"hutchinson"``: :math:`\frac1S\sum_s z_s \odot H z_s`, Rademacher
    :math:`z_s`; unbiased for :math:`\operatorname{diag} H`. ``num_samples``
    HVPs.
  * ``"fisher"``: :math:`\frac1S\sum_s (\nabla_\theta \tfrac1B\sum_i
    \mathrm{CE}(f_i(\theta), \hat y_{i,s}))^2` with labels :math:`\hat y \sim
    \operatorname{softmax}(f(\theta))` sampled from the model (the
    Gauss-Newton-Bartlett estimator of Wang et al., 2024). Its expectation is
    :math:`\operatorname{diag}(G)/B` with :math:`G` the Gauss-Newton matrix
    of the mean cross-entropy over the ``B`` examples of the batch (IRE only
    ranks, so the scale does not matter). Needs ``logits_fn(params, batch) ->
    logits`` (class axis last); ``loss_fn`` is not used. ``num_samples``
    gradients.
  * ``"grad_sq"``: :math:`g \odot g` with :math:`g = \nabla L(\theta; B)`
    (free inside IRE, which already has the gradient; here one gradient).
    Deterministic: ``key`` and ``num_samples`` are not used.

  Args:
    loss_fn: ``(params, batch) -> scalar loss``.
    params: where the estimate is taken (any pytree; bfloat16 allowed).
    batch: the data passed to ``loss_fn`` / ``logits_fn``.
    key: PRNG key (required by ``"hutchinson"`` and ``"fisher"``).
    method: ``"hutchinson"``, ``"fisher"`` or ``"grad_sq"``.
    num_samples: number of probes / label samples averaged (static, ``>= 1``).
    logits_fn: ``(params, batch) -> logits``, for ``"fisher"`` only.

  Returns:
    float32 pytree like ``params``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import ire_optax.sharpness as sh
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)
    >>> sh.hessian_diagonal(loss, jnp.zeros(3), jnp.array([1., 2., 3.]),
    ...                     key=jax.random.key(0))
    Array([1., 2., 3.], dtype=float32)
  """
  utils.check_choice("method", method, ("hutchinson", "fisher", "grad_sq"))
  num_samples = utils.check_static_int("num_samples", num_samples)
  if method != "grad_sq" and key is None:
    raise ValueError(f"hessian_diagonal(method={method!r}) needs a PRNG `key`.")
  if method != "grad_sq":
    _check_key(key)
  params32 = _f32(params)
  key = jax.random.key(0) if key is None else key  # not used by "grad_sq"
  if method == "fisher":
    fn = utils.require_callable("logits_fn", logits_fn, who="hessian_diagonal(method='fisher')",
                                why="(params, batch) -> logits, used to sample labels")
    logits_of = lambda p: fn(p, batch)
    if num_samples == 1:
      return estimators.fisher_diag(logits_of, params32, key)
    est = jax.lax.map(lambda k: estimators.fisher_diag(logits_of, params32, k),
                      jax.random.split(key, num_samples))
    return jax.tree.map(lambda x: jnp.mean(x, axis=0), est)
  _check_loss(loss_fn, params32, batch)
  grad_fn = _grad_fn(loss_fn, batch)
  if method == "grad_sq":
    return estimators.grad_sq_diag(grad_fn(params32))
  return estimators.hutchinson_diag(grad_fn, params32, key, num_samples=num_samples)


# -----------------------------------------------------------------------------
# SAM sharpness and m-sharpness
# -----------------------------------------------------------------------------


def sam_sharpness(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    rho: float | jax.Array = 0.05,
    num_steps: int = 5,
    adaptive: bool = False,
    unroll: int | bool = 1,
) -> jax.Array:
  r"""SAM's sharpness :math:`\max_{\|\epsilon\|_2 \le \rho} L(\theta+\epsilon) - L(\theta)`.

  Approximated by normalised gradient ascent on the sphere from
  :math:`\epsilon_0 = 0`:
  :math:`\epsilon_{i+1} = \rho\, g_i / (\|g_i\| + 10^{-12})`,
  :math:`g_i = \nabla L(\theta + \epsilon_i)`, for :math:`i < ` ``num_steps``;
  the result is the largest :math:`L(\theta+\epsilon_i) - L(\theta)` over the
  iterates (including :math:`\epsilon_0 = 0`, so it is :math:`\ge 0`).
  ``num_steps=1`` is the one-step approximation that SAM itself uses
  (:math:`\epsilon = \rho g/\|g\|`). Each step maximises the linearised loss
  over the ball, so for a convex loss the iterates increase monotonically; for
  a quadratic :math:`\tfrac12\epsilon^\top H\epsilon + g^\top\epsilon` the
  exact trust-region maximiser is a fixed point, and
  :math:`\rho\|g\| + \tfrac{\rho^2}{2}\hat g^\top H \hat g \le` sharpness
  :math:`\le \rho\|g\| + \tfrac{\rho^2}{2}\lambda_{\max}`.

  **The ascent starts along g, and sees only what g points at.** Like power
  iteration started from :math:`g`, it finds the top curvature only through
  :math:`g`'s component along the top eigenvectors. After (full-batch) gradient
  descent that component is damped fastest and can be nil, and where
  :math:`\rho \gtrsim 2\|g\|/\lambda_{\max}` the result is then far below the
  maximum: 3× below on logistic regression on MNIST after gradient descent with
  the default 5 steps, and at an exact critical point (:math:`g = 0`) it is 0.
  Compare it with :math:`\rho^2\lambda_{\max}/2` from
  :func:`top_hessian_eigs`, or use :func:`summary`, which also evaluates the
  loss at :math:`\theta \pm \rho v_{\max}`; more steps help only as rounding
  brings out the missing component (10–20 steps there).

  The result is a lower bound up to the float32 rounding of the two losses
  (``params`` are cast to float32, float64 included): at a radius where the
  sharpness is near the float32 spacing of :math:`L(\theta)` it may exceed the
  maximum by that spacing.

  With ``adaptive=True`` (ASAM, Kwon et al., 2021) the ball is
  :math:`\|T^{-1}\epsilon\| \le \rho` with :math:`T = |\theta|`, and
  :math:`\epsilon_{i+1} = \rho T^2 g_i / (\|T g_i\| + 10^{-12})`.

  Cost: ``num_steps`` gradients and one extra loss evaluation.

  References:
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving
    Generalization*, ICLR 2021 (eq. 1 and §C.3, m-sharpness).

  Args:
    loss_fn: ``(params, batch) -> scalar loss``.
    params: the point :math:`\theta` (any pytree; bfloat16 allowed).
    batch: the data passed to ``loss_fn`` (any pytree, or ``None``).
    rho: radius :math:`\rho \ge 0` (may be a traced scalar; a traced negative
      or non-finite radius gives NaN).
    num_steps: number of ascent steps (static, ``>= 1``).
    adaptive: use ASAM's scale-invariant ball.
    unroll: loop unrolling of the ascent (static; see :func:`top_hessian_eigs`).

  Returns:
    float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> import ire_optax.sharpness as sh
    >>> loss = lambda p, b: jnp.sum(b * p)   # linear: sharpness = rho * ||b||
    >>> round(float(sh.sam_sharpness(loss, jnp.zeros(2), jnp.array([3., 4.]), rho=0.1)), 6)
    0.5
  """
  num_steps = utils.check_static_int("num_steps", num_steps)
  unroll = _check_unroll(unroll)
  utils.check_range("rho", rho, low=0.0, high=utils.FLOAT32_MAX)
  utils.check_not_schedule("rho", rho)
  utils.check_bool("adaptive", adaptive)
  params32 = _prepare(loss_fn, params, batch)
  loss = _scalar_loss(loss_fn, batch)
  rho = jnp.asarray(rho, jnp.float32)

  def shifted(g):
    return sam.perturbed_params(params32, g, rho, adaptive=adaptive, eps=_NORM_EPS)

  loss0, g = jax.value_and_grad(loss)(params32)

  def step(_, carry):
    g, best = carry
    value, g = jax.value_and_grad(loss)(shifted(g))
    return g, jnp.maximum(best, value - loss0)

  g, best = jax.lax.fori_loop(0, num_steps - 1, step, (g, jnp.zeros((), jnp.float32)),
                              unroll=unroll)
  return _nan_unless_radius(rho, jnp.maximum(best, loss(shifted(g)) - loss0))


def _nan_unless_radius(rho: jax.Array, value: jax.Array) -> jax.Array:
  r"""``value``, or NaN where the (traced) radius is negative or not finite: checked eagerly
  otherwise, such a radius would give 0 (the ascent's ``max`` with :math:`\epsilon_0 = 0`)."""
  return jnp.where((rho >= 0) & jnp.isfinite(rho), value, jnp.nan)


def m_sharpness(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    num_microbatches: int,
    rho: float | jax.Array = 0.05,
    num_steps: int = 5,
    adaptive: bool = False,
    unroll: int | bool = 1,
) -> jax.Array:
  r"""m-sharpness: the mean SAM sharpness of ``m`` disjoint micro-batches.

  The batch (every leaf along its leading axis) is split into ``m =
  num_microbatches`` contiguous micro-batches :math:`B_1..B_m`, and
  :math:`\frac1m \sum_j \max_{\|\epsilon_j\|\le\rho} L_{B_j}(\theta+\epsilon_j)
  - L_{B_j}(\theta)` is returned, each term by :func:`sam_sharpness` (vmapped
  over the micro-batches). This is the quantity mSAM minimises, and the
  m-sharpness that Foret et al. found to correlate best with generalisation,
  in *their* notation with :math:`m` the micro-batch **size**: their
  m-sharpness of a batch of :math:`B` examples is ``num_microbatches = B / m``
  here. ``num_microbatches=1`` is :func:`sam_sharpness`; the caveats of its
  ascent apply to every micro-batch.

  Args:
    loss_fn: ``(params, batch) -> scalar loss`` (called on a micro-batch).
    params: the point :math:`\theta` (any pytree; bfloat16 allowed).
    batch: a pytree of arrays whose leading axis (the batch size) is divisible
      by ``num_microbatches``.
    num_microbatches: ``m >= 1`` (static).
    rho: radius :math:`\rho \ge 0`.
    num_steps: ascent steps per micro-batch (static, ``>= 1``).
    adaptive: use ASAM's scale-invariant ball.
    unroll: loop unrolling of the ascent (static; see :func:`top_hessian_eigs`).

  Returns:
    float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> import ire_optax.sharpness as sh
    >>> loss = lambda p, b: jnp.mean(b @ p)
    >>> b = jnp.array([[3., 4.], [3., 4.], [0., 1.], [0., 1.]])
    >>> round(float(sh.m_sharpness(loss, jnp.zeros(2), b, rho=0.1, num_microbatches=2)), 6)
    0.3
  """
  m = utils.check_static_int("num_microbatches", num_microbatches)
  unroll = _check_unroll(unroll)
  num_steps = utils.check_static_int("num_steps", num_steps)
  utils.check_range("rho", rho, low=0.0, high=utils.FLOAT32_MAX)
  utils.check_not_schedule("rho", rho)
  utils.check_bool("adaptive", adaptive)
  micro = sam.split_batch(batch, m, who="m_sharpness", layout="replicated")
  params32 = _f32(params)
  per_micro = jax.vmap(
      lambda b: sam_sharpness(loss_fn, params32, b, rho=rho, num_steps=num_steps,
                              adaptive=adaptive, unroll=unroll)
  )(micro)
  return jnp.mean(per_micro)


# -----------------------------------------------------------------------------
# One-call report
# -----------------------------------------------------------------------------


def summary(
    loss_fn: LossFn,
    params: Params,
    batch: Batch,
    *,
    key: jax.Array,
    num_iters: int = 20,
    num_samples: int = 10,
    rho: float | jax.Array = 0.05,
    num_steps: int = 1,
) -> dict[str, jax.Array]:
  r"""The usual end-of-training sharpness report, as a dict of float32 scalars.

  ``{"loss", "top_eig", "trace", "trace_se", "sam_sharpness"}``: the loss, the
  largest Hessian eigenvalue (Lanczos, ``num_iters`` HVPs), Hutchinson's trace
  and its standard error (``num_samples`` HVPs) and SAM's sharpness at radius
  ``rho``: the larger of :func:`sam_sharpness` (``num_steps`` gradients) and
  :math:`L(\theta \pm \rho v_{\max}) - L(\theta)` along the top eigenvector
  (two losses), which the ascent from :math:`g` misses where :math:`g` has no
  component along it (after gradient descent; :func:`sam_sharpness`). Both are
  points of the ball, so the result is still a lower bound of the maximum.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import ire_optax.sharpness as sh
    >>> loss = lambda p, b: 0.5 * jnp.sum(b * p ** 2)
    >>> r = sh.summary(loss, jnp.zeros(3), jnp.array([1., 2., 3.]), key=jax.random.key(0),
    ...                num_iters=3)
    >>> round(float(r["top_eig"]), 4), round(float(r["trace"]), 4)
    (3.0, 6.0)
  """
  _check_key(key)
  for name, value in (("num_iters", num_iters), ("num_samples", num_samples),
                      ("num_steps", num_steps)):
    utils.check_static_int(name, value)  # all checked before any work is done
  utils.check_range("rho", rho, low=0.0, high=utils.FLOAT32_MAX)
  params32 = _prepare(loss_fn, params, batch)
  n = selection.num_elements(params32)
  if n == 0:
    raise ValueError("summary() needs parameters with at least one element; got none.")
  key_eig, key_trace = jax.random.split(key)
  vals, vecs = top_hessian_eigs(loss_fn, params32, batch, key=key_eig, k=1,
                                num_iters=min(num_iters, n))
  trace, trace_se = hessian_trace(loss_fn, params32, batch, key=key_trace,
                                  num_samples=num_samples)
  loss = _scalar_loss(loss_fn, batch)
  loss0 = loss(params32)
  r = jnp.asarray(rho, jnp.float32)
  along = lambda sign: loss(jax.tree.map(lambda p, v: p + sign * r * v[0], params32, vecs))
  sharpness = jnp.maximum(sam_sharpness(loss_fn, params32, batch, rho=rho, num_steps=num_steps),
                          jnp.maximum(along(1.0), along(-1.0)) - loss0)
  return {
      "loss": loss0,
      "top_eig": vals[0],
      "trace": trace,
      "trace_se": trace_se,
      "sam_sharpness": sharpness,  # NaN for a bad traced radius: sam_sharpness's, propagated
  }
