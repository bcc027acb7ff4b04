"""The clipped sum of one chunk on the device mesh: ``make_accumulate_fn`` and its ``Accumulator``.

:mod:`dpmega.train.step` runs one logical step as chunks summed by this
function, then one noisy update (its module docstring has the whole picture and
the guarantees). Here: each device clips ITS rows (``clipped_grad_sum``, a
``lax.scan`` over micro-batches), then a psum over the mesh / psum_scatter over
fsdp gives the float32 sum, sharded like the params. No noise is ever added
here (invariant 2: noise once per logical step, in the update).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dpmega import clipping as clipping_lib
from dpmega import sharding
from dpmega.clipping import ClipStats
from dpmega.validation import check_int

PyTree = Any


class Accumulator(NamedTuple):
  """Running float32 sum of clipped per-example gradients, and clipping stats."""

  grad_sum: PyTree
  stats: ClipStats


def _reduce_leaf(g: jax.Array, spec: P, axes: tuple[str, ...]) -> jax.Array:
  """Sums ``g`` over ``axes``; over the axis that shards the leaf, a reduce-scatter."""
  for dim, name in enumerate(spec):
    if name is None:
      continue
    names = (name,) if isinstance(name, str) else tuple(name)
    rest = tuple(a for a in axes if a not in names)
    if rest:
      g = jax.lax.psum(g, rest)
    return jax.lax.psum_scatter(g, names if len(names) > 1 else names[0], scatter_dimension=dim, tiled=True)
  return jax.lax.psum(g, axes)


def _reduce_stats(stats: ClipStats, axes: tuple[str, ...]) -> ClipStats:
  summed = jax.lax.psum(stats._replace(norm_max=jnp.zeros_like(stats.norm_max)), axes)
  return summed._replace(norm_max=jax.lax.pmax(stats.norm_max, axes))


def make_accumulate_fn(
    loss_fn: Callable[..., Any],
    mesh: Mesh,
    param_shardings: PyTree,
    *,
    clip_norm: float,
    microbatch_size: int,
    has_aux: bool = False,
    clipping: str = "auto",
    clip_rule: clipping_lib.ClipRule | None = None,
    on_trace: Callable[[], None] | None = None,
    adaptive: bool = False,
) -> Callable[..., Accumulator]:
  """A jitted ``accumulate(params, acc, batch, mask) -> acc`` that adds one chunk's clipped, masked sum.

  Each device runs :func:`dpmega.clipping.clipped_grad_sum` on its own rows of
  the chunk (``microbatch_size`` rows per ``lax.scan`` step, per device); the
  per-device clipped sums are reduced by XLA collectives -- ``psum`` over the
  mesh, or a reduce-scatter over ``fsdp`` for a sharded leaf -- and added to
  ``acc.grad_sum``, which keeps ``param_shardings``. No noise is added.

  Guarantee: the result equals ``acc.grad_sum + clipped_grad_sum(loss_fn,
  params, batch, mask, clip_norm=clip_norm)`` on one device, up to float
  summation order: each example's contribution has L2 norm ``<= clip_norm``
  over all parameters; masked and non-finite rows contribute 0.

  Args:
    loss_fn: ``loss_fn(params, example) -> loss`` (or ``(loss, aux)``; aux is dropped) for ONE example.
    mesh: from :func:`dpmega.sharding.make_mesh`.
    param_shardings: ``NamedSharding`` per parameter leaf (:func:`dpmega.sharding.param_shardings`).
    clip_norm: the L2 bound C.
    microbatch_size: rows per scan step on EACH device; a chunk's row count
      must be a multiple of ``mesh.size * microbatch_size``.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    clipping: a mode of :func:`dpmega.clipping.clipping_modes`.
    clip_rule: how norms become weights (:class:`dpmega.clipping.ClipRule`); None: ``min(1, C / ||g||)``.
    on_trace: called each time JAX traces (compiles) a new chunk shape.
    adaptive: the clip norm is an argument, ``accumulate(params, acc, batch, mask, clip_norm_t)`` (traced:
      one compilation for every value), and ``clip_norm`` must be 1: each example's gradient of
      ``loss / clip_norm_t`` is clipped at norm 1 and the sum multiplied by ``clip_norm_t``, so each
      contribution is at most ``clip_norm_t (1 + 1e-5)(1 + 2^-23)`` (:mod:`dpmega.train.adaptive_clip`);
      the stats are in the gradient's own units (norms and losses times ``clip_norm_t``).

  Returns:
    ``accumulate`` (its jitted core, for ``.lower``, is ``accumulate.jitted``; ``acc`` is left intact).
    ``accumulate.add_in_place`` (core ``accumulate.in_place_jitted``) is the same with ``acc.grad_sum``
    DONATED: its buffers are reused for the result (the chunk's sum is added in place, no table-sized copy), so
    it must not be used after the call. ``accumulate.start(params, batch, mask[, clip_norm_t])`` is the first
    chunk's call: the same
    result as ``accumulate`` from a zero accumulator (``-0.0`` sums aside), without creating or adding one
    (its jitted core is ``accumulate.start_jitted``). ``params`` and ``acc.grad_sum`` carry
    ``param_shardings``; ``batch`` and ``mask`` are global arrays
    (:func:`dpmega.sharding.global_batch_from_process_local`) or, on one process, host arrays.
  """
  clipping_lib.validate_clip_norm(clip_norm)
  microbatch_size = check_int("microbatch_size", microbatch_size, 1)
  if clipping not in clipping_lib.clipping_modes():
    raise ValueError(f"clipping must be one of {clipping_lib.clipping_modes()}, got {clipping=!r}.")
  axes = sharding.batch_axes(mesh)
  specs = jax.tree_util.tree_map(lambda s: s.spec, param_shardings)
  bspec = P(axes)

  if adaptive and clip_norm != 1.0:
    raise ValueError(f"clip_norm must be 1.0 with adaptive=True (the clip norm is then an argument), got {clip_norm=}.")

  def local(params, batch, mask, scale=None):
    def scaled_loss(p, ex):  # the gradient of loss / C_t, clipped at 1 below: C_t times the clip at C_t
      out = loss_fn(p, ex)
      return (out[0] / scale, out[1]) if has_aux else out / scale

    g, _, stats = clipping_lib.clipped_grad_sum(
        scaled_loss if adaptive else loss_fn, params, batch, mask, clip_norm=clip_norm,
        microbatch_size=microbatch_size, has_aux=has_aux, clipping=clipping, clip_rule=clip_rule)
    if adaptive:
      g = jax.tree_util.tree_map(lambda x: x * scale.astype(x.dtype), g)
      stats = stats._replace(norm_sum=stats.norm_sum * scale, norm_max=stats.norm_max * scale,
                             loss_sum=stats.loss_sum * scale)
    if mesh.size > 1:  # on one device the collectives are identities, but XLA would copy table-sized sums
      g = jax.tree_util.tree_map(lambda x, s: _reduce_leaf(x, s, axes), g, specs)
      stats = _reduce_stats(stats, axes)
    return g, stats

  # check_vma=False: clipped_grad_sum's scan starts from a device-invariant zero
  # carry; the psum / psum_scatter above make every output what out_specs say.
  per_device = jax.shard_map(local, mesh=mesh, in_specs=(P(), bspec, bspec) + ((P(),) if adaptive else ()),
                             out_specs=(specs, P()), check_vma=False)

  def step(params, grad_sum, acc_stats: ClipStats, batch, mask, *scale) -> Accumulator:
    if on_trace is not None:
      on_trace()
    g, stats = per_device(params, batch, mask, *scale)
    return Accumulator(jax.tree_util.tree_map(jnp.add, grad_sum, g), acc_stats.merge(stats))

  def first(params, batch, mask, *scale) -> Accumulator:
    if on_trace is not None:
      on_trace()
    g, stats = per_device(params, batch, mask, *scale)
    return Accumulator(g, ClipStats.zeros().merge(stats))

  rep, bsh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  acc_sh = Accumulator(param_shardings, rep)
  scale_sh = (rep,) if adaptive else ()
  # add_in_place: acc.grad_sum is donated, the chunk's clipped sum is added in place (XLA turns
  # `acc + scatter(0, ids, rows)` into a scatter into acc), so a chunk costs no table-sized copy; the caller must
  # not reuse it. (Only the sum: ClipStats.zeros() shares one buffer between fields; it cannot be donated twice.)
  in_sh = (param_shardings, param_shardings, rep, bsh, bsh) + scale_sh
  jitted = _AccJit(jax.jit(step, in_shardings=in_sh, out_shardings=acc_sh))
  in_place_jitted = _AccJit(jax.jit(step, in_shardings=in_sh, out_shardings=acc_sh, donate_argnums=(1,)))
  first_jitted = jax.jit(first, in_shardings=(param_shardings, bsh, bsh) + scale_sh, out_shardings=acc_sh)
  per_step_rows = mesh.size * microbatch_size

  def accumulate(params, acc: Accumulator, batch, mask, clip_norm_t=None) -> Accumulator:
    return jitted(params, acc, batch, mask, *_checked(batch, mask, clip_norm_t))

  def add_in_place(params, acc: Accumulator, batch, mask, clip_norm_t=None) -> Accumulator:
    return in_place_jitted(params, acc, batch, mask, *_checked(batch, mask, clip_norm_t))

  def start(params, batch, mask, clip_norm_t=None) -> Accumulator:
    return first_jitted(params, batch, mask, *_checked(batch, mask, clip_norm_t))

  def _checked(batch, mask, clip_norm_t) -> tuple:
    """The call's trailing arguments (``clip_norm_t`` as float32 when adaptive), after checking the inputs."""
    rows = clipping_lib.leading_size(batch)
    if rows == 0 or rows % per_step_rows:
      raise ValueError(
          f"batch rows must be a positive multiple of mesh.size * microbatch_size = {per_step_rows} "
          f"(pad with masked rows), got {rows}.")
    if tuple(jnp.shape(mask)) != (rows,):
      raise ValueError(f"mask must have shape ({rows},) to match the batch, got {tuple(jnp.shape(mask))}.")
    if adaptive != (clip_norm_t is not None):
      raise ValueError(f"clip_norm_t must be given exactly when adaptive=True, got {adaptive=} and {clip_norm_t=}.")
    if adaptive:
      clipping_lib.validate_clip_norm(clip_norm_t)
      if not 0 < float(clip_norm_t) < math.inf:
        raise ValueError(f"clip_norm_t must be positive and finite, got {clip_norm_t=}.")
    return () if clip_norm_t is None else (np.float32(clip_norm_t),)

  accumulate.jitted = jitted
  accumulate.add_in_place = add_in_place
  accumulate.in_place_jitted = in_place_jitted
  accumulate.start = start
  accumulate.start_jitted = first_jitted
  return accumulate


class _AccJit:
  """A jitted core taking ``(params, grad_sum, stats, ...)``, called (or lowered) as ``(params, acc, batch, mask[,
  scale])``: ``accumulate.jitted`` and the donating ``accumulate.in_place_jitted``."""

  def __init__(self, core):
    self.core = core

  def __call__(self, params, acc: Accumulator, *rest):
    return self.core(params, acc.grad_sum, acc.stats, *rest)

  def lower(self, params, acc: Accumulator, *rest):
    return self.core.lower(params, acc.grad_sum, acc.stats, *rest)
