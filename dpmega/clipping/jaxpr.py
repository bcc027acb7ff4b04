"""Which parameters the fast clipping path can take, read from the loss's jaxpr.

``loss_fn`` is traced for ONE example to a jaxpr, and each parameter leaf is
followed (through dtype casts, transposes and nested ``jit``/``remat`` calls)
to the primitives that consume it: a ``dot_general`` with an activation, a row
``gather`` or a ``dynamic_slice`` of whole rows is a recognised use
(:class:`Use`); any other use sends the whole leaf to ``vmap``. This works for
Linen, NNX and plain JAX functions alike. :func:`evaluate` runs the jaxpr again
with a perturbation added to each recognised use's output (its gradient is the
``dL/dz`` that :mod:`dpmega.clipping.ghost` needs) and captures the activations.
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

PyTree = Any

# Call-like primitives whose body we follow (the parameters inside are found).
_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call", "remat2", "checkpoint"})
_CASTS = frozenset({"convert_element_type", "copy", "copy_p"})


class NormMethod(enum.Enum):
  """How the norm of a recognised parameter's per-example gradient is computed."""

  GRAM = "gram"  # sum_{s,t} (x_s . x_t)(y_s . y_t): memory b n^2.
  MATERIALIZE = "materialize"  # the example's K x N gradient: memory b K N.
  AUTO = "auto"  # per parameter, whichever has fewer elements (n^2 vs K N).
  ROWS = "rows"  # lookups only: duplicate ids summed, dpmega.clipping.rows (chosen, not asked for).


@dataclasses.dataclass(frozen=True)
class Use:
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


def _dot_use(eqn, tags, path) -> Use | None:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  tl, tr = tags
  if (tl is None) == (tr is None) or lb or rb:
    return None
  w_side = 0 if tl is not None else 1
  leaf, perm = tl if w_side == 0 else tr
  w_c, a_c = (lc, rc) if w_side == 0 else (rc, lc)
  return Use(path, "dot", leaf, w_side=w_side, w_contract=tuple(perm[d] for d in w_c),
              a_contract=tuple(a_c), perm=tuple(perm))


def _gather_use(eqn, tags, path) -> Use | None:
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
  return Use(path, "gather", leaf, mode=mode) if ok else None


def _slice_use(eqn, tags, path) -> Use | None:
  """``table[i]`` with a scalar ``i`` traces to ``dynamic_slice`` of whole rows (clamped start)."""
  if tags[0] is None or any(t is not None for t in tags[1:]):
    return None
  leaf, perm = tags[0]
  shape = eqn.invars[0].aval.shape
  sizes = tuple(eqn.params["slice_sizes"])
  if perm != (0, 1) or len(shape) != 2 or len(sizes) != 2 or sizes[1] != shape[1] or sizes[0] < 1:
    return None
  return Use(path, "slice", leaf, slice_rows=sizes[0])


def analyze(closed, num_leaves: int):
  """Finds recognised uses of each param leaf; returns (uses by path, fallback leaves, pert avals)."""
  uses: dict[tuple[int, ...], Use] = {}
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


def evaluate(closed, active: dict, inlined: set, args: Sequence[Any], perts: dict):
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


def leaf_plan(uses: list[Use], shape: tuple[int, ...]):
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


def plan_layers(loss_fn: Callable[..., Any], params: PyTree, example: PyTree,
                method: NormMethod = NormMethod.AUTO) -> LayerPlan:
  """Which parameter leaves of ``loss_fn(params, example)`` take the fast path.

  ``example`` is ONE example (no batch axis), arrays or ``jax.ShapeDtypeStruct``.
  """
  leaves, _ = jax.tree_util.tree_flatten(params)
  closed = jax.make_jaxpr(lambda p, e: jax.tree_util.tree_leaves(loss_fn(p, e)))(params, example)
  uses, fallback, avals, _ = analyze(closed, len(leaves))
  ghost, methods, fb = partition(uses, fallback, leaves, avals, method)
  names = {i: jax.tree_util.keystr(k) for i, (k, _) in enumerate(jax.tree_util.tree_flatten_with_path(params)[0])}
  used = set(ghost) | set(fb)
  return LayerPlan(
      ghost={i: len(v) for i, (v, _) in ghost.items()}, fallback=tuple(sorted(fb)),
      unused=tuple(i for i in range(len(leaves)) if i not in used), methods=methods, names=names)


def partition(uses, fallback, leaves, avals, method):
  """``(ghost {leaf: (uses, canonical X dims)}, methods, fallback leaves)`` from :func:`analyze`."""
  by_leaf: dict[int, list[Use]] = {}
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
    canon = leaf_plan(us, shape)
    if canon is None:
      fallback.add(leaf)
      continue
    ghost[leaf] = (us, canon)
    methods[leaf] = _choose(method, us, shape, canon, avals)
  return ghost, methods, fallback
