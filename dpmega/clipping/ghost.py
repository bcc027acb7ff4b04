"""Exact per-example clipping without per-example weight gradients ("ghost" clipping).

For a parameter ``W`` that enters the loss only through products with
activations -- ``z = dot_general(a, W)`` (Flax ``Dense``, ``DenseGeneral``,
the projections of ``MultiHeadDotProductAttention``, ``Embed.attend``) or a
row lookup ``z = W[ids]`` (Flax ``Embed``, ``jnp.take``) -- the per-example
gradient is ``sum_u X_u^T Y_u`` over the uses ``u`` of ``W``, where one factor
is the activation ``a`` (or the one-hot ids) and the other is
``g = dL_i / dz``. We never form it for a whole batch:

* **norms**: ``||sum_u X_u^T Y_u||^2 = sum_{s,t} (x_s . x_t)(y_s . y_t)`` over
  all rows of all uses (the cross terms between uses included, so a tied or
  re-used weight is exact), or -- when cheaper, ``n^2 > K N`` -- by forming the
  one example's ``K x N`` gradient ("mixed ghost clipping", Bu et al. 2022).
  Row lookups go through :mod:`dpmega.clipping.rows` (duplicate ids summed).
* **clipped sum**: the book-keeping trick (Bu et al. 2023): with the clip
  factors ``c_i``, ``sum_i c_i X_i^T Y_i`` is one matmul over the batch (a
  scatter-add for lookups); no second backward pass.

Every other parameter (biases, LayerNorm scales, a weight used in any op not
listed above, inside ``custom_jvp``/``scan``/...) gets its per-example
gradient by ``vmap``, in the same backward pass, only for that parameter. The
per-example norm is the global norm over all parameters, and the weights and
stats come from :func:`dpmega.clipping.combine`, so every mode counts alike.

Layers are found by tracing ``loss_fn`` for one example to a jaxpr and
following each parameter leaf (through dtype casts, transposes and nested
``jit``/``remat`` calls) to the primitives that consume it. This works for
Linen, NNX and plain JAX functions alike.

Guarantee: for every input, finite or not, each example's contribution to
the returned float32 sum has L2 norm ``<= clip_norm * (1 + 1e-5)`` over all
parameters. The Gram norm ``sum_{s,t} (x_s . x_t)(y_s . y_t)`` can lose all
its digits to cancellation (rows ``v`` and ``-v + d``), and the book-keeping
matmul rounds differently from it, so each leaf also gets a rigorous bound on
what the book-keeping adds (Gram rounding bounded term by term, plus
``gamma_{n+2} sum_s |x_s| |y_s|`` for the matmul; operands scaled by powers of
two so nothing under- or overflows; positive sums as trees of bounded depth).
The bound is used only where it exceeds the estimate by more than 5e-6
relative; and within a budget of ``_MATERIALIZE_BUDGET`` floats per leaf, the
examples with the loosest bound are materialized and contribute exactly the
gradient their norm was taken from. Lookups scatter each example's
duplicate-id rows summed (:func:`dpmega.clipping.rows.dedup_rows`), the rows
their norm came from. On benign inputs the result equals
:func:`dpmega.clipping.clipped_sum_vmap` (same norms, clipped sum and stats) to
float rounding; an op the fast path does not recognise only makes it slower
(``vmap`` for the parameters involved), never different.

Edge cases (besides those of :mod:`dpmega.clipping`, which hold unchanged
because the weights come from ``combine``; mirrored by ``tests/test_ghost.py``
and ``tests/test_embeddings.py``):

===============================================  ==================================
input                                            behaviour
===============================================  ==================================
weight used twice / tied (``Embed.attend``)      one norm over all uses, cross terms
weight in an unrecognised op too (``sin(W)``)    whole weight by ``vmap``
weight inside ``custom_jvp`` / ``scan`` / cond   whole weight by ``vmap``
``stop_gradient`` on activations                 respected (it stays in the jaxpr)
lookup id out of range, fill / promise mode      row gets no gradient (dropped), as ``jax.grad``
lookup id out of range, ``mode="clip"``          clamped, as ``jax.grad`` (unsigned ids exact)
cancellation across positions or ids             clipped by the bound, or materialized
activations ``1e-19`` / ``1e19``                 scaled: no under- or overflow in the norm
integer params leaf                              ``ValueError`` before any compute (every mode)
NaN in a masked or non-finite example            zeroed before the book-keeping sum
bf16 parameters or compute                       norms and sums in float32, bound on the f32 sums
===============================================  ==================================

.. warning::
   ``loss_fn`` is traced once per call for ONE example (to find the layers);
   Python side effects in it run at trace time, as under ``jax.jit``.

References:
  Li et al. 2022, "Large language models can be strong differentially private
  learners" (ghost clipping), https://arxiv.org/abs/2110.05679.
  Bu et al. 2022, "Scalable and efficient training of large convolutional
  neural networks with differential privacy" (mixed ghost clipping),
  https://arxiv.org/abs/2205.10683.
  Bu et al. 2023, "Differentially private optimization on large model at
  small cost" (book-keeping), https://arxiv.org/abs/2210.00038.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable, Sequence

import jax
from jax import lax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from dpmega import clipping as clipping_lib
from dpmega.clipping import rows as rows_lib

PyTree = Any

# Call-like primitives whose body we follow (the parameters inside are found).
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint"})
_CASTS = frozenset({"convert_element_type", "copy", "copy_p"})
_HIGHEST = lax.Precision.HIGHEST
# Relative room between the norm estimate and its rigorous bound before the bound is used: of the 1e-5 that
# the guarantee allows, the rest covers the positive-sum rounding (<= 4.5e-6 up to 1e6 terms, halved in the
# norm) and the few roundings after the norm (clip factor, product by it).
_BOUND_SLACK = 5e-6
# Floats of materialized per-example gradients per GRAM leaf and micro-batch, for the examples whose bound is loose.
_MATERIALIZE_BUDGET = 1 << 16


class NormMethod(enum.Enum):
  """How the norm of a recognised parameter's per-example gradient is computed."""

  GRAM = "gram"  # sum_{s,t} (x_s . x_t)(y_s . y_t): memory b n^2.
  MATERIALIZE = "materialize"  # the example's K x N gradient: memory b K N.
  AUTO = "auto"  # per parameter, whichever has fewer elements (n^2 vs K N).
  ROWS = "rows"  # lookups only: duplicate ids summed, dpmega.clipping.rows (chosen, not asked for).


@dataclasses.dataclass(frozen=True)
class _Use:
  """One recognised use of a parameter leaf, found at ``path`` in the jaxpr."""

  path: tuple[int, ...]
  kind: str  # "dot", "gather" or "slice" (``dynamic_slice`` of whole rows)
  leaf: int
  # dot: which operand is the weight, and its contracted dims in PARAM coordinates,
  # paired (same order) with the activation's contracted dims.
  w_side: int = 0
  w_contract: tuple[int, ...] = ()
  a_contract: tuple[int, ...] = ()
  # dims of the weight operand (var coordinates) -> param dims.
  perm: tuple[int, ...] = ()
  mode: Any = None  # gather mode
  slice_rows: int = 0  # slice: number of consecutive rows

  def split(self) -> frozenset[int]:
    """The param dims on the ``X`` side of this use's outer product."""
    return frozenset(self.w_contract) if self.kind == "dot" else frozenset({0})


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """Which parameter leaves take which path (for reporting and tests).

  Attributes:
    ghost: ``{leaf index: number of uses}`` for leaves on the fast path.
    fallback: leaf indices whose per-example gradients are materialized by vmap.
    unused: leaf indices the loss does not depend on (zero gradient).
    methods: ``{leaf index: NormMethod}`` chosen for each ghost leaf.
    names: ``{leaf index: key path string}``.
  """

  ghost: dict[int, int]
  fallback: tuple[int, ...]
  unused: tuple[int, ...]
  methods: dict[int, NormMethod]
  names: dict[int, str]

  def describe(self) -> str:
    lines = []
    for i, name in sorted(self.names.items()):
      if i in self.ghost:
        how = f"ghost/{self.methods[i].value} ({self.ghost[i]} use{'s' if self.ghost[i] > 1 else ''})"
      elif i in self.fallback:
        how = "vmap"
      else:
        how = "unused"
      lines.append(f"{name}: {how}")
    return "\n".join(lines)


def _inner(eqn) -> tuple[Any, Sequence[Any]] | None:
  if eqn.primitive.name not in _INLINE:
    return None
  for key in ("jaxpr", "call_jaxpr"):
    j = eqn.params.get(key)
    if isinstance(j, jex.ClosedJaxpr):
      return j.jaxpr, j.consts
    if isinstance(j, jex.Jaxpr):
      return j, ()
  return None


def _dot_use(eqn, tags, path) -> _Use | None:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  tl, tr = tags
  if (tl is None) == (tr is None) or lb or rb:
    return None
  w_side = 0 if tl is not None else 1
  leaf, perm = tl if w_side == 0 else tr
  w_c, a_c = (lc, rc) if w_side == 0 else (rc, lc)
  return _Use(path, "dot", leaf, w_side=w_side, w_contract=tuple(perm[d] for d in w_c),
              a_contract=tuple(a_c), perm=tuple(perm))


def _gather_use(eqn, tags, path) -> _Use | None:
  t_op, t_idx = tags
  if t_op is None or t_idx is not None:
    return None
  leaf, perm = t_op
  op_aval, idx_aval = eqn.invars[0].aval, eqn.invars[1].aval
  out_aval = eqn.outvars[0].aval
  dn = eqn.params["dimension_numbers"]
  mode = eqn.params["mode"]
  ok = (
      perm == (0, 1)
      and len(op_aval.shape) == 2
      and idx_aval.shape[-1:] == (1,)
      and tuple(dn.offset_dims) == (len(out_aval.shape) - 1,)
      and tuple(dn.collapsed_slice_dims) == (0,)
      and tuple(dn.start_index_map) == (0,)
      and not tuple(dn.operand_batching_dims)
      and not tuple(dn.start_indices_batching_dims)
      and tuple(eqn.params["slice_sizes"]) == (1, op_aval.shape[1])
      and mode in (lax.GatherScatterMode.FILL_OR_DROP, lax.GatherScatterMode.CLIP,
                   lax.GatherScatterMode.PROMISE_IN_BOUNDS))
  return _Use(path, "gather", leaf, mode=mode) if ok else None


def _slice_use(eqn, tags, path) -> _Use | None:
  """``table[i]`` with a scalar ``i`` traces to ``dynamic_slice`` of whole rows (clamped start)."""
  if tags[0] is None or any(t is not None for t in tags[1:]):
    return None
  leaf, perm = tags[0]
  shape = eqn.invars[0].aval.shape
  sizes = tuple(eqn.params["slice_sizes"])
  if perm != (0, 1) or len(shape) != 2 or len(sizes) != 2 or sizes[1] != shape[1] or sizes[0] < 1:
    return None
  return _Use(path, "slice", leaf, slice_rows=sizes[0])


def _analyze(closed, num_leaves: int):
  """Finds recognised uses of each param leaf; returns (uses by path, fallback leaves, pert avals)."""
  uses: dict[tuple[int, ...], _Use] = {}
  out_avals: dict[tuple[int, ...], Any] = {}
  fallback: set[int] = set()
  inlined: set[tuple[int, ...]] = set()

  def walk(jaxpr, in_tags, prefix):
    env = {}
    for v in jaxpr.constvars:
      env[v] = None
    for v, t in zip(jaxpr.invars, in_tags):
      env[v] = t
    read = lambda v: None if isinstance(v, jex.Literal) else env.get(v)
    for i, eqn in enumerate(jaxpr.eqns):
      path = prefix + (i,)
      tags = [read(v) for v in eqn.invars]
      out_tags = [None] * len(eqn.outvars)
      if any(t is not None for t in tags):
        name = eqn.primitive.name
        inner = _inner(eqn)
        use = None
        handled = True
        if inner is not None and len(inner[0].invars) == len(tags):
          inlined.add(path)
          out_tags = walk(inner[0], tags, path)
        elif name in _CASTS and len(eqn.invars) == 1:
          out_tags = [tags[0]]
        elif name == "transpose":
          leaf, perm = tags[0]
          out_tags = [(leaf, tuple(perm[p] for p in eqn.params["permutation"]))]
        elif name == "dot_general":
          use = _dot_use(eqn, tags, path)
          handled = use is not None
        elif name == "gather":
          use = _gather_use(eqn, tags, path)
          handled = use is not None
        elif name == "dynamic_slice":
          use = _slice_use(eqn, tags, path)
          handled = use is not None
        else:
          handled = False
        if use is not None:
          uses[path] = use
          out_avals[path] = eqn.outvars[0].aval
        if not handled:
          fallback.update(t[0] for t in tags if t is not None)
      for v, t in zip(eqn.outvars, out_tags):
        env[v] = t
    return [read(v) for v in jaxpr.outvars]

  outs = walk(closed.jaxpr, [(i, tuple(range(len(v.aval.shape)))) for i, v in
                             enumerate(closed.jaxpr.invars[:num_leaves])] + [None] * (
                                 len(closed.jaxpr.invars) - num_leaves), ())
  fallback.update(t[0] for t in outs if t is not None)
  return uses, fallback, out_avals, inlined


def _evaluate(closed, active: dict, inlined: set, args: Sequence[Any], perts: dict):
  """Evaluates the jaxpr, adding ``perts[path]`` to each active use's output.

  Returns ``(outputs, captured)`` where ``captured[path]`` is the activation
  (dot) or index (gather) operand of each active use.
  """
  captured = {}

  def run(jaxpr, consts, vals, prefix):
    env = {}
    for v, x in zip(jaxpr.constvars, consts):
      env[v] = x
    for v, x in zip(jaxpr.invars, vals):
      env[v] = x
    read = lambda v: v.val if isinstance(v, jex.Literal) else env[v]
    for i, eqn in enumerate(jaxpr.eqns):
      path = prefix + (i,)
      invals = [read(v) for v in eqn.invars]
      if path in inlined:
        inner_jaxpr, inner_consts = _inner(eqn)
        outs = run(inner_jaxpr, inner_consts, invals, path)
      else:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
        if not eqn.primitive.multiple_results:
          outs = [outs]
        if path in active:
          use = active[path]
          captured[path] = invals[1 - use.w_side] if use.kind == "dot" else invals[1]
          outs = [outs[0] + perts[path]]
      for v, x in zip(eqn.outvars, outs):
        env[v] = x
    return [read(v) for v in jaxpr.outvars]

  return run(closed.jaxpr, closed.consts, args, ()), captured


def _dot_factors(use: _Use, a: jax.Array, g: jax.Array):
  """``(A [b, n, K_A], G [b, n, K_G])``: A over the contracted param dims (ascending), G over the rest."""
  b = a.shape[0]
  a_nd = a.ndim - 1
  a_free = [d for d in range(a_nd) if d not in use.a_contract]
  pairs = sorted(zip(use.w_contract, use.a_contract))
  a_mat = jnp.transpose(a, [0] + [1 + d for d in a_free] + [1 + d for _, d in pairs])
  n = int(np.prod([a.shape[1 + d] for d in a_free], dtype=np.int64))
  a_mat = a_mat.reshape(b, n, -1)
  # Output dims: (lhs free..., rhs free...); the weight's free dims come in its operand's order.
  w_var_contract = [use.perm.index(p) for p in use.w_contract]
  w_free_var = [d for d in range(len(use.perm)) if d not in w_var_contract]
  w_free_param = [use.perm[d] for d in w_free_var]
  n_a, n_w = len(a_free), len(w_free_var)
  a_axes = list(range(n_a)) if use.w_side == 1 else list(range(n_w, n_w + n_a))
  w_axes = list(range(n_a, n_a + n_w)) if use.w_side == 1 else list(range(n_w))
  w_axes = [w_axes[j] for j in np.argsort(w_free_param)]
  g_mat = jnp.transpose(g, [0] + [1 + d for d in a_axes + w_axes]).reshape(b, n, -1)
  return a_mat, g_mat


def _leaf_plan(uses: list[_Use], shape: tuple[int, ...]):
  """Canonical X-side dims for a leaf, or None if its uses do not share one outer-product split."""
  nd = len(shape)
  if any(u.kind != "dot" for u in uses):
    canon = frozenset({0})
  else:
    canon = uses[0].split()
  comp = frozenset(range(nd)) - canon
  for u in uses:
    if u.split() not in (canon, comp):
      return None
  return canon


def _choose(method: NormMethod, uses, shape, canon, avals) -> NormMethod:
  if all(u.kind != "dot" for u in uses):
    return NormMethod.ROWS
  if any(u.kind != "dot" for u in uses):
    return NormMethod.GRAM
  if method != NormMethod.AUTO:
    return method
  n = 0
  for u in uses:
    out = avals[u.path].shape
    free_w = len(shape) - len(u.w_contract)
    n += int(np.prod(out[:len(out) - free_w] if u.w_side == 1 else out[free_w:], dtype=np.int64))
  k = int(np.prod([shape[d] for d in sorted(canon)], dtype=np.int64))
  m = int(np.prod([shape[d] for d in range(len(shape)) if d not in canon], dtype=np.int64))
  return NormMethod.GRAM if n * n <= k * m else NormMethod.MATERIALIZE


def _from_canonical(mat: jax.Array, shape: tuple[int, ...], canon: frozenset[int]) -> jax.Array:
  order = sorted(canon) + [d for d in range(len(shape)) if d not in canon]
  full = mat.reshape([shape[d] for d in order])
  return jnp.transpose(full, np.argsort(order))


def _clamp_ids(idx: jax.Array, hi: int) -> jax.Array:
  """``clip(idx, 0, hi)`` in ``idx``'s own integer type, then int32 (a uint32 id >= 2^31 must not wrap to < 0)."""
  if jnp.issubdtype(idx.dtype, jnp.unsignedinteger):
    return jnp.minimum(idx, hi).astype(jnp.int32)
  return jnp.clip(idx, 0, hi).astype(jnp.int32)


def _gather_ids(idx: jax.Array, v_rows: int, mode) -> tuple[jax.Array, jax.Array]:
  """``(ids int32, valid)`` of a row gather, with JAX's gradient semantics for out-of-range ids.

  ``clip`` clamps in the forward pass and in the gradient; ``fill`` and
  ``promise_in_bounds`` (plain ``E[ids]``) drop the row from the gradient
  (XLA's scatter skips out-of-bounds updates), whatever the forward pass read.
  Compared in ``idx``'s own type, so unsigned ids are exact.
  """
  if mode == lax.GatherScatterMode.CLIP:
    return _clamp_ids(idx, v_rows - 1), jnp.ones(idx.shape, bool)
  valid = idx < v_rows
  if not jnp.issubdtype(idx.dtype, jnp.unsignedinteger):
    valid = valid & (idx >= 0)
  return jnp.where(valid, idx, 0).astype(jnp.int32), valid


def _materialize_count(method: NormMethod, b: int, x, y, rows) -> int:
  """How many examples of a dense leaf get their gradient materialized (static).

  All of them under MATERIALIZE. Under GRAM, none when the bound cannot be
  loose (one row, no lookups: no cancellation), else as many as fit in
  ``_MATERIALIZE_BUDGET`` floats, at least one: the examples whose bound is
  loosest, which on benign inputs covers every example of a small layer and a
  crafted one in a large layer; the others keep the (never permissive) bound.
  """
  if method == NormMethod.MATERIALIZE:
    return b
  if (x.shape[1] == 1 and rows is None) or _MATERIALIZE_BUDGET <= 0:  # budget 0: the bound alone (tests)
    return 0
  per_example = int(x.shape[2]) * int(y.shape[2])
  return int(min(b, max(1, _MATERIALIZE_BUDGET // max(per_example, 1))))


def _materialize(x, y, ids, rows, k_rows: int) -> jax.Array:
  """``[k, K, N]`` per-example gradients ``sum_s x_s y_s^T`` (+ the summed lookup rows of a tied table)."""
  g = jnp.einsum("bnk,bnm->bkm", x, y, precision=_HIGHEST)
  if rows is not None:
    g = g + jax.vmap(lambda i, r: jnp.zeros((k_rows, r.shape[-1]), jnp.float32).at[i].add(r, mode="drop"))(ids, rows)
  return g


def _dense_norm_bounds(x, y, ids, rows) -> tuple[jax.Array, jax.Array]:
  """``(estimate, bound)`` of the norm of one leaf's per-example gradient, ``[b]`` each.

  The gradient is ``G = sum_s x_s y_s^T`` (+ ``sum_t onehot(ids_t) rows_t^T`` for a tied table). The estimate
  is the Gram norm, as vmap would compute it. The bound is a rigorous upper bound on the
  norm of what the book-keeping sum adds for the example, ``fl(sum_s x_s (w y_s)^T)`` divided by its weight
  ``w``, whatever the cancellation: ``sqrt(max(n2, 0) + E) + gamma_{n+2} U`` where ``n2`` is the computed
  squared norm, ``E`` bounds its rounding error term by term and ``U = sum_s |x_s| |y_s|`` (Higham, 3.5) bounds
  the rounding of the book-keeping matmul (``n`` products summed per entry, one product by ``w``, one add of
  the rows). Everything is computed on operands scaled by powers of two (exact) so that nothing under- or
  overflows, and positive sums are trees of bounded depth (:func:`dpmega.clipping.sum_nonneg`).
  """
  b, n, kx = x.shape
  ny_dim = y.shape[2]
  ex = clipping_lib.exponent(x, (1, 2))
  ey = clipping_lib.exponent(y, (1, 2))
  e = ex + ey
  if rows is not None:
    # A common scale for the dense part and the rows of a tied table (the larger of the two is O(1)).
    e = jnp.maximum(e, clipping_lib.exponent(rows, (1, 2)))
  xs = clipping_lib.scale_pow2(x, ex)
  ys = clipping_lib.scale_pow2(y, e - ex)
  g_kx, g_ny = clipping_lib.gamma(kx), clipping_lib.gamma(ny_dim)
  flat = lambda m: m.reshape(b, -1)
  aa = jnp.einsum("bsk,btk->bst", xs, xs, precision=_HIGHEST)
  bb = jnp.einsum("bsk,btk->bst", ys, ys, precision=_HIGHEST)
  # Row norms from the Gram diagonals (each within gamma_K of the true squared norm), rounded up to bounds.
  sx = jnp.diagonal(aa, axis1=1, axis2=2) * (1.0 + 2.0 * g_kx)
  sy = jnp.diagonal(bb, axis1=1, axis2=2) * (1.0 + 2.0 * g_ny)
  nx, ny = jnp.sqrt(sx), jnp.sqrt(sy)
  u_dense = clipping_lib.sum_nonneg(nx * ny)  # [b]
  terms = aa * bb
  # One tree for the estimate and its three error sums (|aa - AA| <= g_kx nx nx, |bb - BB| <= g_ny ny ny).
  sums = clipping_lib.sum_nonneg(jnp.stack([
      flat(terms), flat(jnp.abs(terms)),
      flat(nx[:, :, None] * nx[:, None, :] * jnp.abs(bb)), flat(jnp.abs(aa) * ny[:, :, None] * ny[:, None, :])],
      axis=1))
  est2, s3, s1, s2 = sums[:, 0], sums[:, 1], sums[:, 2], sums[:, 3]
  err2 = (g_kx * s1 + g_ny * s2 + g_kx * g_ny * jnp.square(u_dense)
          + (clipping_lib.tree_gamma(n * n) + clipping_lib.UNIT_ROUNDOFF) * s3)
  u_total = u_dense
  if rows is not None:
    rs = clipping_lib.scale_pow2(rows, e)
    sr = clipping_lib.sum_nonneg(jnp.square(rs))  # [b, n_rows]; duplicates already summed
    nr = jnp.sqrt(sr)
    # Cross terms between dense uses and lookups of a tied table: x_s . onehot(id_t) = x_s[id_t].
    xi = jnp.take_along_axis(xs, ids[:, None, :], axis=2)  # [b, n, n_rows], exact
    yi = jnp.einsum("bsm,btm->bst", ys, rs, precision=_HIGHEST)
    cross = xi * yi
    rows2 = clipping_lib.sum_nonneg(sr)
    cross_sum = clipping_lib.sum_nonneg(flat(cross))
    gram2, est2 = est2, est2 + rows2 + 2.0 * cross_sum
    g_d = clipping_lib.tree_gamma(rows.shape[2]) + clipping_lib.UNIT_ROUNDOFF
    err2 = err2 + (g_d * rows2
                   + 2.0 * g_ny * clipping_lib.sum_nonneg(flat(jnp.abs(xi) * ny[:, :, None] * nr[:, None, :]))
                   + 2.0 * (clipping_lib.tree_gamma(n * rows.shape[1]) + clipping_lib.UNIT_ROUNDOFF)
                   * clipping_lib.sum_nonneg(flat(jnp.abs(cross)))
                   # the two additions of the three parts
                   + 2.0 * clipping_lib.UNIT_ROUNDOFF * (jnp.abs(gram2) + rows2 + 2.0 * jnp.abs(cross_sum)))
    # The rows are scattered as summed (one product by w, one add to the dense part each).
    u_total = u_dense + clipping_lib.sum_nonneg(nr)
  est_s = jnp.sqrt(jnp.maximum(est2, 0.0))
  # 1.001 on the error terms only: room for their own rounding (they are positive sums of a few roundings).
  upper_s = (jnp.sqrt(jnp.maximum(est2, 0.0) + 1.001 * err2)
             + 1.001 * (clipping_lib.gamma(n + 2) * u_dense
                        + 2 * clipping_lib.UNIT_ROUNDOFF * (u_total - u_dense)))
  return clipping_lib.unscale_pow2(est_s, e), clipping_lib.unscale_pow2(upper_s, e)


def plan_layers(loss_fn: Callable[..., Any], params: PyTree, example: PyTree,
                method: NormMethod = NormMethod.AUTO) -> LayerPlan:
  """Which parameter leaves of ``loss_fn(params, example)`` take the fast path.

  ``example`` is ONE example (no batch axis), arrays or ``jax.ShapeDtypeStruct``.
  """
  leaves, _ = jax.tree_util.tree_flatten(params)
  closed = jax.make_jaxpr(lambda p, e: jax.tree_util.tree_leaves(loss_fn(p, e)))(params, example)
  uses, fallback, avals, _ = _analyze(closed, len(leaves))
  ghost, methods, fb = _partition(uses, fallback, leaves, avals, method)
  names = {i: jax.tree_util.keystr(k) for i, (k, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0])}
  used = set(ghost) | set(fb)
  return LayerPlan(
      ghost={i: len(v) for i, (v, _) in ghost.items()}, fallback=tuple(sorted(fb)),
      unused=tuple(i for i in range(len(leaves)) if i not in used), methods=methods, names=names)


def _partition(uses, fallback, leaves, avals, method):
  by_leaf: dict[int, list[_Use]] = {}
  for u in uses.values():
    by_leaf.setdefault(u.leaf, []).append(u)
  fallback = set(fallback)
  ghost, methods = {}, {}
  for leaf, us in by_leaf.items():
    if leaf in fallback:
      continue
    dtype = jnp.result_type(leaves[leaf])
    if not jnp.issubdtype(dtype, jnp.floating):
      fallback.add(leaf)
      continue
    shape = tuple(np.shape(leaves[leaf]))
    canon = _leaf_plan(us, shape)
    if canon is None:
      fallback.add(leaf)
      continue
    ghost[leaf] = (us, canon)
    methods[leaf] = _choose(method, us, shape, canon, avals)
  return ghost, methods, fallback


def clipped_sum_ghost(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    clip_norm: float | jax.Array,
    has_aux: bool = False,
    *,
    method: NormMethod = NormMethod.AUTO,
) -> tuple[PyTree, Any, clipping_lib.ClipStats]:
  """Clipped, masked sum of one micro-batch without per-example weight gradients.

  Same signature, result and guarantee as :func:`dpmega.clipping.clipped_sum_vmap`.

  Args:
    loss_fn: ``loss_fn(params, example) -> loss`` (or ``(loss, aux)``) for ONE example.
    params: pytree to differentiate.
    batch: pytree with a leading batch axis.
    mask: ``[b]``, 1 for real examples.
    clip_norm: the L2 bound C.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    method: norm method for recognised layers (:class:`NormMethod`).

  Returns:
    ``(grad_sum float32 like params, aux or None, ClipStats)``.
  """
  if method not in (NormMethod.AUTO, NormMethod.GRAM, NormMethod.MATERIALIZE):
    raise ValueError(f"method must be NormMethod.AUTO, GRAM or MATERIALIZE, got {method=!r}.")
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if not leaves:
    raise ValueError("params has no leaves: nothing to differentiate.")
  leaves = [jnp.asarray(x) for x in leaves]
  ex_leaves, ex_def = jax.tree_util.tree_flatten(batch)
  ex_leaves = [jnp.asarray(x) for x in ex_leaves]
  b = ex_leaves[0].shape[0]
  example = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in ex_leaves]
  out_def = []

  def flat_loss(p_leaves, e_leaves):
    out = loss_fn(jax.tree_util.tree_unflatten(treedef, p_leaves), jax.tree_util.tree_unflatten(ex_def, e_leaves))
    flat, tree = jax.tree_util.tree_flatten(out)
    out_def.append(tree)
    return flat

  closed = jax.make_jaxpr(flat_loss)(leaves, example)
  uses, fallback, avals, inlined = _analyze(closed, len(leaves))
  ghost, methods, fb = _partition(uses, fallback, leaves, avals, method)
  fb = sorted(fb)
  active = {u.path: u for us, _ in ghost.values() for u in us}
  perts0 = {p: jnp.zeros(avals[p].shape, avals[p].dtype) for p in active}

  def per_example(fb_vals, perts, e_leaves):
    args = list(leaves)
    for j, v in zip(fb, fb_vals):
      args[j] = v
    outs, captured = _evaluate(closed, active, inlined, args + list(e_leaves), perts)
    out = jax.tree_util.tree_unflatten(out_def[0], outs)
    loss, aux = out if has_aux else (out, None)
    return loss, (loss, aux, captured)

  grad_fn = jax.grad(per_example, argnums=(0, 1), has_aux=True)
  (fb_grads, g_perts), (losses, aux, captured) = jax.vmap(grad_fn, in_axes=(None, None, 0))(
      [leaves[j] for j in fb], perts0, ex_leaves)

  # Per-leaf factors in canonical orientation: dense (X [b,n,K], Y [b,n,N]) and lookups (ids, first, summed rows).
  factors = {}
  est_norms, upper_norms = [], []  # [b] per leaf: the estimate, and a rigorous bound on what is added
  for leaf, (us, canon) in ghost.items():
    shape = tuple(leaves[leaf].shape)
    dense_x, dense_y, ids_l, valid_l, rows_l = [], [], [], [], []
    for u in us:
      g = g_perts[u.path].astype(jnp.float32)
      act = captured[u.path]
      if u.kind == "slice":
        v_rows, k = shape[0], u.slice_rows
        start = _clamp_ids(act.reshape(b), v_rows - k)  # dynamic_slice clamps its start, as does its transpose
        ids_l.append(start[:, None] + jnp.arange(k, dtype=jnp.int32)[None])
        valid_l.append(jnp.ones((b, k), bool))
        rows_l.append(g.reshape(b, k, -1))
      elif u.kind == "gather":
        rows = g.reshape(b, -1, shape[1])
        ids, valid = _gather_ids(act.reshape(b, rows.shape[1]), shape[0], u.mode)
        ids_l.append(ids)
        valid_l.append(valid)
        rows_l.append(jnp.where(valid[..., None], rows, 0.0))
      else:
        a_mat, g_mat = _dot_factors(u, act.astype(jnp.float32), g)
        x, y = (a_mat, g_mat) if u.split() == canon else (g_mat, a_mat)
        dense_x.append(x)
        dense_y.append(y)
    xd = jnp.concatenate(dense_x, axis=1) if dense_x else None
    yd = jnp.concatenate(dense_y, axis=1) if dense_y else None
    ids = first = rows = None
    if ids_l:
      # Duplicate ids summed once, here: the norm and the scatter below use the same summed rows.
      ids = jnp.concatenate(ids_l, axis=1)
      rows, first = rows_lib.dedup_rows(ids, jnp.concatenate(rows_l, axis=1), jnp.concatenate(valid_l, axis=1))
    sel = g_sel = None
    if xd is None:
      est = upper = clipping_lib.scaled_norms(rows)
    else:
      k_rows = int(np.prod([shape[d] for d in sorted(canon)], dtype=np.int64))
      n_sel = _materialize_count(methods[leaf], b, xd, yd, rows)
      if xd.shape[1] == 1 and rows is None:
        # One row: G = x y^T, ||G|| = ||x|| ||y|| with no cancellation, and the book-keeping adds each entry as
        # one product (relative error 2u): the estimate is its own bound.
        est = upper = clipping_lib.scaled_norms(xd) * clipping_lib.scaled_norms(yd)
      elif n_sel < b:
        est, upper = _dense_norm_bounds(xd, yd, ids, rows)
      if n_sel:
        # These examples' gradients are materialized, and both their norm and their contribution are taken from
        # the materialized numbers (as vmap does): exact wherever the bound above is loose (cancellation).
        if n_sel == b:
          sel = jnp.arange(b)
        else:
          loose = jnp.where(est > 0, upper / jnp.where(est > 0, est, 1.0), jnp.where(upper > 0, jnp.inf, 0.0))
          loose = jnp.where((mask > 0) & ~jnp.isnan(loose), loose, -1.0)
          sel = lax.top_k(loose, n_sel)[1]
        g_sel = _materialize(xd[sel], yd[sel], None if ids is None else ids[sel], None if rows is None else rows[sel],
                             k_rows)
        m = clipping_lib.scaled_norms(g_sel)
        est = m if n_sel == b else est.at[sel].set(m)
        upper = m if n_sel == b else upper.at[sel].set(m)
    factors[leaf] = (xd, yd, ids, first, rows, sel, g_sel)
    est_norms.append(est)
    upper_norms.append(upper)
  for g in fb_grads:
    norm = clipping_lib.scaled_norms(g)
    est_norms.append(norm)
    upper_norms.append(norm)
  est = clipping_lib.hypot(est_norms)
  upper = clipping_lib.hypot(upper_norms)
  # The estimate is what vmap would give; the bound is used only where it exceeds the estimate by more than
  # the slack, so benign examples keep vmap's clip factors and a crafted one is clipped by its bound.
  norms = jnp.maximum(est, upper / (1.0 + _BOUND_SLACK))

  weights, stats = clipping_lib.combine(norms, mask, clip_norm, losses)
  keep = weights > 0
  out_leaves = [jnp.zeros(np.shape(x), jnp.float32) for x in leaves]  # unused leaves stay 0
  for leaf, (xd, yd, ids, first, rows, sel, g_sel) in factors.items():
    us, canon = ghost[leaf]
    shape = tuple(leaves[leaf].shape)
    order = sorted(canon) + [d for d in range(len(shape)) if d not in canon]
    k = int(np.prod([shape[d] for d in sorted(canon)], dtype=np.int64))
    total = None  # no zeros-and-add pass over a whole (embedding) table
    w_bk, keep_bk = weights, keep
    if sel is not None:
      w_sel = weights[sel]
      g_w = jnp.where((w_sel > 0)[:, None, None], g_sel * w_sel[:, None, None], 0.0)
      total = jnp.sum(g_w, axis=0)
      # The materialized examples are not added again by the book-keeping below.
      w_bk = weights.at[sel].set(0.0)
      keep_bk = w_bk > 0
    if xd is not None and (sel is None or sel.shape[0] < xd.shape[0]):
      xw = jnp.where(keep_bk[:, None, None], xd, 0.0)
      yw = jnp.where(keep_bk[:, None, None], yd * w_bk[:, None, None], 0.0)
      # One [b*n, K]^T [b*n, M] matmul: the layout of the non-private weight gradient.
      bk = jnp.einsum("nk,nm->km", xw.reshape(-1, xw.shape[-1]), yw.reshape(-1, yw.shape[-1]), precision=_HIGHEST)
      total = bk if total is None else total + bk
    if ids is not None and (sel is None or sel.shape[0] < ids.shape[0]):
      scattered = rows_lib.scatter_add_rows(ids, rows, k, valid=first, weights=w_bk)
      total = scattered if total is None else total + scattered
    out_leaves[leaf] = _from_canonical(total, shape, canon) if order != list(range(len(shape))) else total.reshape(shape)
  if fb:
    sums = clipping_lib.weighted_sum(fb_grads, weights)
    for j, s in zip(fb, sums):
      out_leaves[j] = s
  return jax.tree_util.tree_unflatten(treedef, out_leaves), aux, stats


def clipped_sum_gram(loss_fn, params, batch, mask, clip_norm, has_aux=False):
  """:func:`clipped_sum_ghost` with pure Gram (ghost) norms for every recognised layer."""
  return clipped_sum_ghost(loss_fn, params, batch, mask, clip_norm, has_aux, method=NormMethod.GRAM)


clipping_lib.register_clipping("auto", clipped_sum_ghost)
clipping_lib.register_clipping("ghost", clipped_sum_gram)
