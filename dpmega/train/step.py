"""The private step on a device mesh: the one path that the trainer, the mesh tests and the benchmarks run.

There is always a mesh (``1 x 1`` for one device). One logical step::

  every process: the step's global sample (secret, generation, t)
                 -> its contiguous share, cut into chunks of the same shapes
                    on every process (dpmega.sampling.iterate_chunks)
  per chunk   :  accumulate(params, acc, batch, mask) -> acc
                   each device: clipped_grad_sum on ITS rows (lax.scan over
                   micro-batches), then psum over the mesh / psum_scatter over
                   fsdp into the float32 sum, sharded like the params; the
                   first chunk's sum is the accumulator (accumulate.start),
                   later ones are added in place (accumulate.add_in_place: acc.grad_sum donated), so a
                   table's clipped rows are scattered straight into the one
                   [R, d] sum: no zero accumulator, no table-sized copy
  once / step :  update(state, grad_sum, step_key(secret, t), sigma, B_t)
                   privatize: ONE Gaussian draw for the whole pytree, / B_t
                   then the optax update, sharded like params and opt state

Guarantees:

* Per-example clipping runs on the device that holds the example, over the
  example's gradient with respect to *all* parameters (the parameters are
  all-gathered inside the step), so each example's contribution to the reduced
  sum has L2 norm ``<= clip_norm``, as on one device (invariant 1); masked
  (padding) and non-finite rows contribute exactly 0 (invariant 4).
* The noise is drawn once per logical step, outside the per-device code, by
  :func:`dpmega.noise.privatize` inside the jitted update. With
  ``jax_threefry_partitionable`` (checked when the update is built:
  :func:`dpmega.sharding.check_partitionable_rng`) the numbers drawn do not
  depend on the sharding, so 1 device and 8 devices add the same noise and
  produce the same update up to float summation order (invariant 2).
* The update divides by the expected batch size ``B_t``, a public constant,
  never the realized one (invariant 3).

.. warning::
   Do not add noise inside ``accumulate`` or per device: every device would
   draw its own noise and the total would be ``sqrt(#devices)`` times too large
   -- or, if the keys coincide, correlated. Noise is added by ``update``, once
   per logical step, to the sum over the whole logical batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from dpmega import clipping as clipping_lib
from dpmega import noise as noise_lib
from dpmega import sampling
from dpmega import sharding
from dpmega import sparse as sparse_lib
from dpmega.clipping import ClipStats
from dpmega.train.accumulate import Accumulator  # noqa: F401 - re-exported (step.Accumulator)
from dpmega.train.accumulate import make_accumulate_fn
from dpmega.validation import check_int

PyTree = Any


class TrainState(NamedTuple):
  """The optimizer's view of a run: what the jitted update maps to itself."""

  step: jax.Array
  params: PyTree
  opt_state: PyTree


def effective_noise_multiplier(noise_multiplier: float, clipped_count_noise: float | None) -> float:
  """The noise multiplier the accountant is fed when a step also releases a noisy clipped count.

  Guarantee: a step that releases ``(S + N(0, (σC)²), K + N(0, σ_b²))``, where
  the clipped sum ``S`` has L2 sensitivity ``C`` and the clipped count ``K``
  sensitivity 1 (add/remove-one), is the Gaussian mechanism with noise
  multiplier ``σ_eff = (σ⁻² + σ_b⁻²)^(-1/2)``: scaled to unit noise, one
  example moves the pair by at most ``sqrt(σ⁻² + σ_b⁻²)``. Under replace-one
  the pair moves by at most ``sqrt(4σ⁻² + σ_b⁻²) <= 2/σ_eff``, which the
  accountant's sensitivity 2 covers. Andrew et al. 2021 (adaptive clipping,
  Theorem 1) account their noisy clipped count the same way.

  Edge cases: ``clipped_count_noise`` None (no count released) returns
  ``noise_multiplier`` unchanged; ``σ_eff < min(σ, σ_b)`` always.

  Example:
    >>> round(effective_noise_multiplier(1.0, 10.0), 6)
    0.995037
  """
  if clipped_count_noise is None:
    return float(noise_multiplier)
  return float((noise_multiplier ** -2 + clipped_count_noise ** -2) ** -0.5)


# ----------------------------------------------------------------------------- noise once, then the optimizer


def make_update_fn(
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    param_shardings: PyTree,
    opt_shardings: PyTree,
    *,
    clip_norm: float,
    noise_sampler: noise_lib.NoiseSampler | str = noise_lib.NoiseSampler.WIDE_TAIL,
    clipped_count_noise: float | None = None,
    sparse: sparse_lib.SparseTables | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """A jitted ``update(state, grad_sum, key, noise_multiplier, expected_batch_size, num_clipped=0, row_counts=None)``.

  Adds the step's single noise draw (:func:`dpmega.noise.privatize`, std
  ``noise_multiplier * clip_norm`` per coordinate, from ``key``) to the whole
  logical batch's clipped sum, divides by the expected batch size, and applies
  the optimizer; the new state keeps the shardings of params and optimizer
  state. With ``clipped_count_noise`` (σ_b), the number of clipped examples is
  released too, plus ``N(0, σ_b²)`` from its own stream of the step's key (the
  step is then accounted at :func:`effective_noise_multiplier`). Every metric
  returned is a function of these noisy releases and the parameters only.
  ``noise_multiplier`` and ``expected_batch_size`` are traced (one compilation
  for a whole schedule) and validated on the host before each call.

  With ``sparse`` (:class:`dpmega.sparse.SparseTables`), the tables it names
  are updated sparsely (:func:`dpmega.sparse.sparse_privatize`, Ghazi et al.
  2023): ``row_counts`` (per table, the logical batch's clipped row counts,
  :func:`dpmega.sparse.make_count_fn`; ``state`` is donated) select rows with noise ``σ1``, the
  gradient gets noise ``σ2`` on the dense leaves and the selected rows only,
  and ``optimizer`` runs lazily on them (:func:`dpmega.sparse.lazy_update`;
  it must be elementwise). ``noise_multiplier`` is then the effective
  ``σ_eff = (σ1⁻² + σ2⁻²)^(-1/2)``, the one the accountant records; the
  split is the config's ``selection_fraction``.

  Returns:
    ``update -> (state, metrics)``; metrics ``noisy_grad_norm``,
    ``update_norm``, ``params_finite`` (1.0 or 0.0) and, with
    ``clipped_count_noise``, ``noisy_clipped_count``; with ``sparse``,
    ``selected_rows`` (kept, all tables), ``update_sparsity`` (kept / table
    rows), ``selection_cap_hit`` (1.0 when a table selected more than
    ``max_rows``), ``selection_sigma`` and ``gradient_sigma``. The jitted
    core is ``update.jitted``.

  Raises:
    RuntimeError: if ``jax_threefry_partitionable`` is off
      (:func:`dpmega.sharding.check_partitionable_rng`).
  """
  clipping_lib.validate_clip_norm(clip_norm)
  noise_sampler = noise_lib.as_sampler(noise_sampler)
  sharding.check_partitionable_rng()
  # Every optimizer gets the step's noise std sigma * C / B_t (public) as the extra argument noise_std
  # (dpmega.train.dp_adam uses it); optax transforms that do not take extra arguments ignore it.
  optimizer = optax.with_extra_args_support(optimizer)

  def _sparse_update(state, grad_sum, key, noise_multiplier, expected_batch_size, row_counts, metrics):
    params, opt_state, m = sparse_lib.sparse_step(
        optimizer, sparse, state.params, state.opt_state, grad_sum, row_counts, key, noise_multiplier=noise_multiplier,
        clip_norm=clip_norm, expected_batch_size=expected_batch_size, sampler=noise_sampler)
    metrics.update(m)
    return TrainState(state.step + 1, params, opt_state), metrics

  def apply_update(state: TrainState, grad_sum, key, noise_multiplier, expected_batch_size, num_clipped,
                   row_counts=None):
    metrics = {}
    if clipped_count_noise is not None:
      key, count_key = jax.random.split(key)
      count = jnp.asarray(num_clipped, jnp.float32)
      metrics["noisy_clipped_count"] = noise_lib.add_gaussian_noise(
          count, count_key, noise_multiplier=clipped_count_noise, clip_norm=1.0, sampler=noise_sampler)
    if sparse is not None:
      return _sparse_update(state, grad_sum, key, noise_multiplier, expected_batch_size, row_counts, metrics)
    noisy_mean = noise_lib.privatize(grad_sum, key, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                                     expected_batch_size=expected_batch_size, sampler=noise_sampler)
    updates, opt_state = optimizer.update(noisy_mean, state.opt_state, state.params,
                                          noise_std=noise_multiplier * clip_norm / expected_batch_size)
    params = optax.apply_updates(state.params, updates)
    finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)]
    metrics.update({"noisy_grad_norm": optax.tree.norm(noisy_mean), "update_norm": optax.tree.norm(updates),
                    "params_finite": jnp.all(jnp.stack(finite)).astype(jnp.float32)})
    return TrainState(state.step + 1, params, opt_state), metrics

  rep = sharding.replicated(mesh)
  state_sh = TrainState(rep, param_shardings, opt_shardings)
  # The key and the scalars may be host values (None: taken as they come).
  jitted = jax.jit(apply_update, in_shardings=(state_sh, param_shardings, None, None, None, None, None),
                   out_shardings=(state_sh, rep), donate_argnums=(0,) if sparse is not None else ())

  def update(state: TrainState, grad_sum, key, noise_multiplier, expected_batch_size, num_clipped=0,
             row_counts=None):
    if (sparse is None) != (row_counts is None):
      raise ValueError("row_counts must be given exactly when the update was built with sparse tables, "
                       f"got row_counts={'None' if row_counts is None else 'counts'} and sparse={sparse}.")
    noise_lib.validate_noise_multiplier(noise_multiplier)
    noise_lib.validate_expected_batch_size(expected_batch_size)
    if not math.isfinite(float(clip_norm)) and float(noise_multiplier) != 0:
      raise ValueError(f"clip_norm must be finite when noise is added, got {clip_norm=}.")
    if not isinstance(num_clipped, jax.Array):
      num_clipped = np.int32(num_clipped)
    return jitted(state, grad_sum, key, np.float32(noise_multiplier), np.float32(expected_batch_size), num_clipped,
                  row_counts)

  update.jitted = jitted
  return update


# ----------------------------------------------------------------------------- the whole step


@dataclasses.dataclass(frozen=True)
class PrivateStep:
  """The sharded step functions of a run on ``mesh`` (built by :func:`make_private_step`).

  Attributes:
    mesh: the device mesh (``1 x 1`` for one device).
    param_shardings: ``NamedSharding`` per parameter leaf.
    opt_shardings: ``NamedSharding`` per optimizer-state leaf (the same rule).
    accumulate: :func:`make_accumulate_fn`'s function.
    update: :func:`make_update_fn`'s function.
    local_rows: rows of one micro-batch on THIS process (its mesh devices x
      the per-device micro-batch): chunk sizes are multiples of it.
    max_microbatches: micro-batches per chunk (per jitted call) at most.
  """

  mesh: Mesh
  param_shardings: PyTree
  opt_shardings: PyTree
  accumulate: Callable[..., Accumulator]
  update: Callable[..., tuple[TrainState, dict[str, jax.Array]]]
  local_rows: int
  max_microbatches: int

  def shard_state(self, state: TrainState, *, donate: bool = False) -> TrainState:
    """``state`` (host or device arrays) put on the mesh: params and optimizer state by the FSDP rule.

    The result owns its buffers (never a view of ``state``'s), so an update that donates the state (the sparse
    one) reuses them in place from the first step. With ``donate=True`` (the caller gives ``state`` up: its
    device arrays are deleted), on one process each leaf is copied and its source freed in turn, so the peak is
    the state plus its largest leaf instead of twice the state.
    """
    shardings = TrainState(sharding.replicated(self.mesh), self.param_shardings, self.opt_shardings)
    if jax.process_count() > 1:
      host = sharding.to_host(state)
      return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, s, may_alias=False), host, shardings)
    done = {}

    def put(x, s):
      if id(x) not in done:
        done[id(x)] = jax.device_put(x, s, may_alias=False)
        if donate and isinstance(x, jax.Array):
          jax.block_until_ready(done[id(x)])
          x.delete()
      return done[id(x)]

    return jax.tree_util.tree_map(put, state, shardings)

  def zero_accumulator(self, params: PyTree) -> Accumulator:
    """A float32 zero sum shaped like ``params``, created directly with the parameter shardings.

    The stats are replicated over the mesh, as ``accumulate`` returns them: the
    same input types on every call, so a run compiles once per chunk shape.
    """
    return Accumulator(sharding.zeros_like_sharded(params, self.param_shardings),
                       sharding.shard(ClipStats.zeros(), sharding.replicated(self.mesh)))

  def chunks(self, source: Any, indices: np.ndarray) -> Iterator[sampling.Chunk]:
    """This process's rows of the step's global sample ``indices``, read chunk by chunk (host arrays)."""
    return sampling.iterate_chunks(source, indices, microbatch_size=self.local_rows,
                                   max_microbatches=self.max_microbatches, process_index=jax.process_index(),
                                   process_count=jax.process_count())

  def clipped_sum(self, params: PyTree, chunks: Iterable[sampling.Chunk],
                  prepare: Callable[[int, PyTree], PyTree] | None = None,
                  clip_norm_t: float | None = None) -> Accumulator:
    """The clipped, masked gradient sum of a whole logical batch, one chunk on the device at a time.

    Args:
      params: the parameters, with :attr:`param_shardings`.
      chunks: this process's chunks (:meth:`chunks`), the same count and
        shapes on every process.
      prepare: ``prepare(i, batch) -> batch`` for chunk ``i`` on the host
        (e.g. BERT masking), before the chunk goes to the devices.
      clip_norm_t: the step's clip norm when the step was built with ``adaptive=True``.
    """
    return self.clipped_sum_with_counts(params, chunks, prepare=prepare, clip_norm_t=clip_norm_t)[0]

  def clipped_sum_with_counts(self, params: PyTree, chunks: Iterable[sampling.Chunk],
                              count: Callable[..., Any] | None = None, counts: Any = None, *,
                              prepare: Callable[[int, PyTree], PyTree] | None = None,
                              clip_norm_t: float | None = None) -> tuple[Accumulator, Any]:
    """:meth:`clipped_sum`, plus the sparse tables' row counts of the same chunks when ``count`` is given.

    ``count`` is :func:`dpmega.sparse.make_count_fn`'s function and ``counts`` its start
    (:func:`dpmega.sparse.zero_counts`): each chunk's clipped row counts are added as the chunk's gradient is,
    so memory stays bounded by the chunk (and ``R`` floats per table) whatever the logical batch size.
    Returns ``(acc, counts)`` (``counts`` unchanged without ``count``).
    """
    acc = None
    extra = () if clip_norm_t is None else (clip_norm_t,)
    for i, chunk in enumerate(chunks):
      batch = chunk.batch if prepare is None else prepare(i, chunk.batch)
      mask = chunk.mask
      if jax.process_count() > 1:  # one process: the jitted call places the host rows itself (cheaper)
        batch, mask = sharding.global_batch_from_process_local((batch, mask), self.mesh)
      if acc is None:  # the first chunk's sum IS the accumulator: no table-sized zeros, no add
        acc = self.accumulate.start(params, batch, mask, *extra)
      else:
        # At most one chunk in flight while the host reads the next: memory stays bounded by the chunk size
        # whatever the logical batch size. The previous chunk's acc is donated (summed in place) by this call.
        jax.block_until_ready(acc)
        acc = self.accumulate.add_in_place(params, acc, batch, mask, *extra)
      if count is not None:
        counts = count(counts, batch, mask)
    return (self.zero_accumulator(params) if acc is None else acc), counts


def make_private_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    params: PyTree,
    *,
    clip_norm: float,
    microbatch_size: int,
    max_microbatches: int,
    has_aux: bool = False,
    clipping: str = "auto",
    clip_rule: clipping_lib.ClipRule | None = None,
    noise_sampler: noise_lib.NoiseSampler | str = noise_lib.NoiseSampler.WIDE_TAIL,
    clipped_count_noise: float | None = None,
    min_shard_size: int = sharding.DEFAULT_MIN_SHARD_SIZE,
    on_trace: Callable[[], None] | None = None,
    adaptive: bool = False,
    sparse: sparse_lib.SparseTables | None = None,
) -> PrivateStep:
  """Builds the sharded accumulate and update of a run on ``mesh``.

  Args:
    loss_fn: per-example loss (see :func:`make_accumulate_fn`).
    optimizer: the optax optimizer the noisy mean gradient goes to.
    mesh: from :func:`dpmega.sharding.make_mesh`; ``MeshConfig(data=1)`` for one device.
    params: the parameters or their shapes (``jax.eval_shape``): only shapes are read.
    clip_norm, microbatch_size, has_aux, clipping, clip_rule, on_trace, adaptive: as in :func:`make_accumulate_fn`
      (``microbatch_size`` is per device).
    max_microbatches: micro-batches per chunk (one jitted call) at most.
    noise_sampler, clipped_count_noise, sparse: as in :func:`make_update_fn`.
    min_shard_size: leaves with fewer elements stay replicated (:func:`dpmega.sharding.fsdp_spec`).

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np, optax
    >>> from dpmega import noise, sharding
    >>> mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
    >>> params = {"w": jnp.zeros(2)}
    >>> ps = make_private_step(lambda p, ex: jnp.dot(p["w"], ex["x"]), optax.sgd(1.0), mesh, params,
    ...                        clip_norm=1.0, microbatch_size=2, max_microbatches=2)
    >>> state = ps.shard_state(TrainState(jnp.zeros((), jnp.int32), params, optax.sgd(1.0).init(params)))
    >>> acc = ps.accumulate(state.params, ps.zero_accumulator(state.params),
    ...                     {"x": np.array([[3.0, 4.0], [0.3, 0.4]], np.float32)}, np.ones(2, np.float32))
    >>> np.asarray(acc.grad_sum["w"], float).round(4).tolist()  # (0.6, 0.8): (3, 4) clipped to norm 1; + (0.3, 0.4)
    [0.9, 1.2]
    >>> state, metrics = ps.update(state, acc.grad_sum, noise.step_key(noise.secret_bytes(), 0), 0.0, 2.0)
    >>> np.asarray(state.params["w"], float).round(4).tolist()  # sgd(1): minus the sum / B, B = 2
    [-0.45, -0.6]
  """
  shapes = jax.eval_shape(lambda p: p, params)
  rule = dict(mesh=mesh, min_size=min_shard_size)
  param_shardings = sharding.param_shardings(shapes, **rule)
  opt_shardings = sharding.param_shardings(jax.eval_shape(optimizer.init, shapes), **rule)
  accumulate = make_accumulate_fn(loss_fn, mesh, param_shardings, clip_norm=clip_norm,
                                  microbatch_size=microbatch_size, has_aux=has_aux, clipping=clipping,
                                  clip_rule=clip_rule,
                                  on_trace=on_trace, adaptive=adaptive)
  update = make_update_fn(optimizer, mesh, param_shardings, opt_shardings, clip_norm=clip_norm,
                          noise_sampler=noise_sampler, clipped_count_noise=clipped_count_noise, sparse=sparse)
  return PrivateStep(mesh, param_shardings, opt_shardings, accumulate, update,
                     local_rows=sharding.local_device_count(mesh) * microbatch_size,
                     max_microbatches=check_int("max_microbatches", max_microbatches, 1))
