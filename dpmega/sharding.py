"""Device meshes, data and parameter sharding, and multi-host batches.

Everything here is JAX's own machinery: a :class:`jax.sharding.Mesh` with a
``data`` axis and an ``fsdp`` axis, :class:`~jax.sharding.NamedSharding`,
``jax.jit`` with in/out shardings, ``jax.shard_map`` for the per-device
clipping, XLA collectives (``psum``, ``psum_scatter``) for the reduction,
``jax.make_array_from_process_local_data`` for multi-host batches and
``jax.distributed`` for multi-host start-up.

The flow of one private step on a mesh::

  every process: global Poisson sample (secret, step) -> its contiguous share,
                 padded to the same chunk shapes as every other process
  every process: load its rows -> global_batch_from_process_local -> [rows, ...]
                 sharded over all mesh devices (data x fsdp)
  per chunk   :  accumulate(params, grad_sum, stats, batch, mask)
                   each device: clipped_grad_sum on ITS rows (scan over
                   micro-batches), then psum over data / psum_scatter over fsdp
  once / step :  privatize(grad_sum, noise.step_key(secret, step), sigma, B)
                   one Gaussian draw of the whole pytree, sharded like params

Guarantees:

* Per-example clipping runs on the device that holds the example, over the
  example's gradient with respect to *all* parameters (the parameters are
  all-gathered inside the step), so each example's contribution to the
  reduced sum has L2 norm ``<= clip_norm``, exactly as on one device.
* The noise is drawn once per logical step, outside the per-device code, by
  :func:`dpmega.noise.privatize`. With ``jax_threefry_partitionable`` (True by
  default in JAX 0.10, checked by :func:`check_partitionable_rng`) the numbers
  drawn do not depend on the output sharding, so 1 device and 8 devices add the
  same noise and produce the same update up to float summation order.
* :func:`process_chunks` gives each process a contiguous slice of the one
  global sample: the union over processes is exactly the global sample, no
  example twice, none dropped, so ``q`` is exactly that of the sampler.
* Every process holds the same root secret, drawn on process 0 and sent by
  :func:`broadcast_secret` over ``jax.distributed`` (never a file or argv),
  so the processes agree on the sample and the noise key without either being
  predictable from outside.

Edge cases:

==============================  ================================================
input                           behaviour
==============================  ================================================
``fsdp == 1``                   parameters and optimizer state replicated
leaf smaller than ``min_size``  replicated (sharding tiny leaves costs more
                                than it saves)
no dim divisible by ``fsdp``    leaf replicated
empty global sample             every process gets zero chunks; the step still
                                adds noise (the trainer must still call
                                ``privatize``)
fewer sampled rows than         a process may get only padding rows (mask 0):
processes                       shapes stay identical on every process
==============================  ================================================

.. warning::
   Do not add noise inside ``accumulate`` or per device: every device would
   draw its own noise and the total would be ``sqrt(#devices)`` times too
   large -- or, if the keys coincide, correlated. Noise goes through the
   function of :func:`make_privatize_fn`, once per logical step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpmega import clipping as clipping_lib
from dpmega import noise as noise_lib
from dpmega import sampling

PyTree = Any

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"

# Leaves with fewer elements stay replicated under FSDP (2^18 floats = 1 MiB).
DEFAULT_MIN_SHARD_SIZE = 2**18


def _check_int(name: str, value: Any, lo: int, hi: float = math.inf) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
    raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {name}={value!r}.")
  return int(value)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Shape of the device mesh.

  Attributes:
    data: size of the data-parallel axis; None: every device not used by
      ``fsdp`` (``len(devices) // fsdp``).
    fsdp: size of the parameter-sharding axis (FSDP / ZeRO-3 style): parameters
      and optimizer state are split over it, the batch is split over both axes.
    min_shard_size: leaves with fewer elements than this stay replicated.
  """

  data: int | None = None
  fsdp: int = 1
  min_shard_size: int = DEFAULT_MIN_SHARD_SIZE

  def __post_init__(self):
    if self.data is not None:
      _check_int("data", self.data, 1)
    _check_int("fsdp", self.fsdp, 1)
    _check_int("min_shard_size", self.min_shard_size, 0)

  def shape(self, num_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` for ``num_devices`` devices; ``ValueError`` if they do not fit."""
    num_devices = _check_int("num_devices", num_devices, 1)
    if self.fsdp > num_devices:
      raise ValueError(f"fsdp must be an int in [1, {num_devices}] (the device count), got fsdp={self.fsdp}.")
    data = num_devices // self.fsdp if self.data is None else self.data
    if data * self.fsdp > num_devices:
      raise ValueError(
          f"data * fsdp must be at most the device count {num_devices}, got data={data}, fsdp={self.fsdp}: "
          f"data must be an int in [1, {num_devices // self.fsdp}].")
    return data, self.fsdp


def make_mesh(config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (default: ``jax.devices()``, all processes).

  Uses ``jax.make_mesh`` so the device order follows the hardware topology (ICI
  rings on TPU). If ``data * fsdp < len(devices)``, the first devices are used
  -- on one process only: with several processes every device must be in the
  mesh, since every process feeds its own share of each batch. For speed, keep
  ``fsdp`` at most the devices of one host (its all-gathers then stay on the
  fast intra-host links).

  Example:
    >>> mesh = make_mesh(MeshConfig(data=1))
    >>> dict(mesh.shape)
    {'data': 1, 'fsdp': 1}
  """
  config = MeshConfig() if config is None else config
  devices = list(jax.devices() if devices is None else devices)
  data, fsdp = config.shape(len(devices))
  if jax.process_count() > 1 and data * fsdp != jax.device_count():
    raise ValueError(f"with {jax.process_count()} processes the mesh must use all {jax.device_count()} devices, "
                     f"got data={data} x fsdp={fsdp}: leave data unset (None) or make data * fsdp = "
                     f"{jax.device_count()}.")
  return jax.make_mesh((data, fsdp), (DATA_AXIS, FSDP_AXIS),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices[:data * fsdp])


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over: all of them (every device gets its own rows)."""
  return tuple(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (example) axis split over every device of ``mesh``; other axes whole."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, *, fsdp_axis: str = FSDP_AXIS,
              min_size: int = DEFAULT_MIN_SHARD_SIZE) -> P:
  """The FSDP partition spec of one leaf, a function of its shape alone.

  The largest dimension divisible by ``fsdp_size`` is split over ``fsdp_axis``
  (the last one on ties); leaves with fewer than ``min_size`` elements, or
  with no divisible dimension, or ``fsdp_size == 1``, are replicated
  (``P()``). Because the rule only sees the shape, applying it to an optax
  state shards every moment (``mu``, ``nu``) exactly like its parameter.

  Example:
    >>> fsdp_spec((1024, 4096), 8, min_size=0)
    P(None, 'fsdp')
    >>> fsdp_spec((10,), 8, min_size=0)
    P()
  """
  shape = tuple(int(d) for d in shape)
  if fsdp_size <= 1 or math.prod(shape) < min_size:
    return P()
  best = None
  for dim, size in enumerate(shape):
    if size % fsdp_size == 0 and (best is None or size >= shape[best]):
      best = dim
  if best is None:
    return P()
  return P(*([None] * best + [fsdp_axis]))


def param_shardings(tree: PyTree, mesh: Mesh, *, fsdp_axis: str = FSDP_AXIS,
                    min_size: int = DEFAULT_MIN_SHARD_SIZE) -> PyTree:
  """``NamedSharding`` per leaf of ``tree`` (params or optimizer state) by :func:`fsdp_spec`.

  Works on arrays and on ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` output),
  so an optimizer state can be created directly sharded:
  ``jax.jit(opt.init, out_shardings=param_shardings(jax.eval_shape(opt.init, params), mesh))``.
  Without a ``fsdp_axis`` in the mesh everything is replicated.
  """
  size = dict(mesh.shape).get(fsdp_axis, 1)
  return jax.tree_util.tree_map(
      lambda x: NamedSharding(mesh, fsdp_spec(jnp.shape(x), size, fsdp_axis=fsdp_axis, min_size=min_size)), tree)


def shard(tree: PyTree, shardings: PyTree | jax.sharding.Sharding) -> PyTree:
  """``jax.device_put`` of ``tree`` with ``shardings`` (a tree of them, or one for all leaves)."""
  return jax.device_put(tree, shardings)


def zeros_like_sharded(tree: PyTree, shardings: PyTree) -> PyTree:
  """A float32 accumulator shaped like ``tree``, created directly with ``shardings``."""
  return jax.tree_util.tree_map(lambda x, s: jnp.zeros(jnp.shape(x), jnp.float32, device=s), tree, shardings)


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


def _reduce_stats(stats: clipping_lib.ClipStats, axes: tuple[str, ...]) -> clipping_lib.ClipStats:
  summed = jax.lax.psum(stats._replace(norm_max=jnp.zeros_like(stats.norm_max)), axes)
  return summed._replace(norm_max=jax.lax.pmax(stats.norm_max, axes))


def make_accumulate_fn(
    loss_fn: Callable[..., Any],
    mesh: Mesh,
    shardings: PyTree,
    *,
    clip_norm: float,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    clipping: str = "auto",
    donate: bool = True,
) -> Callable[..., Any]:
  """A jitted ``accumulate(params, grad_sum, stats, batch, mask)`` for one chunk on ``mesh``.

  Each device runs :func:`dpmega.clipping.clipped_grad_sum` on its own rows of
  the chunk (``microbatch_size`` rows per ``lax.scan`` step, per device); the
  per-device clipped sums are reduced by XLA collectives -- ``psum`` over the
  mesh, or a reduce-scatter over ``fsdp`` for a sharded leaf -- and added to
  ``grad_sum``, which keeps ``shardings`` and is donated. No noise is added.

  Guarantee: the returned sum equals ``grad_sum + clipped_grad_sum(loss_fn,
  params, batch, mask, clip_norm=clip_norm)`` on one device, up to float
  summation order: each example's contribution has L2 norm ``<= clip_norm``
  over all parameters; masked and non-finite rows contribute 0.

  Args:
    loss_fn: ``loss_fn(params, example) -> loss`` (or ``(loss, aux)``) for ONE example.
    mesh: from :func:`make_mesh`.
    shardings: ``NamedSharding`` per parameter leaf (:func:`param_shardings`).
    clip_norm: the L2 bound C.
    microbatch_size: rows per scan step on EACH device; the chunk's row count
      must be a multiple of ``mesh.size * microbatch_size`` (``mesh.size`` if None).
    has_aux: ``loss_fn`` returns ``(loss, aux)``; aux comes back per example,
      sharded like the batch.
    clipping: a mode of :func:`dpmega.clipping.clipping_modes`.
    donate: reuse ``grad_sum``'s buffers for the result (the passed-in
      ``grad_sum`` is then deleted).

  Returns:
    ``accumulate(params, grad_sum, stats, batch, mask) -> (grad_sum, stats)``
    (``(grad_sum, stats, aux)`` with ``has_aux``). ``params`` and ``grad_sum``
    must carry ``shardings``; ``batch`` and ``mask`` are global arrays
    (:func:`global_batch_from_process_local`) or, on one process, host arrays.
  """
  clipping_lib.validate_clip_norm(clip_norm)
  if microbatch_size is not None:
    _check_int("microbatch_size", microbatch_size, 1)
  if clipping not in clipping_lib.clipping_modes():
    raise ValueError(f"clipping must be one of {clipping_lib.clipping_modes()}, got {clipping=!r}.")
  axes = batch_axes(mesh)
  specs = jax.tree_util.tree_map(lambda s: s.spec, shardings)
  bspec = P(axes)

  def local(params, batch, mask):
    g, aux, stats = clipping_lib.clipped_grad_sum(
        loss_fn, params, batch, mask, clip_norm=clip_norm, microbatch_size=microbatch_size,
        has_aux=has_aux, clipping=clipping)
    g = jax.tree_util.tree_map(lambda x, s: _reduce_leaf(x, s, axes), g, specs)
    return g, _reduce_stats(stats, axes), aux

  # check_vma=False: clipped_grad_sum's scan starts from a device-invariant zero
  # carry; the psum / psum_scatter above make every output what out_specs say.
  per_device = jax.shard_map(local, mesh=mesh, in_specs=(P(), bspec, bspec), out_specs=(specs, P(), bspec),
                             check_vma=False)

  def step(params, grad_sum, stats, batch, mask):
    g, chunk_stats, aux = per_device(params, batch, mask)
    grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, g)
    out = (grad_sum, stats.merge(chunk_stats))
    return out + (aux,) if has_aux else out

  rep, bsh = replicated(mesh), batch_sharding(mesh)
  out_shardings = (shardings, rep, bsh) if has_aux else (shardings, rep)
  jitted = jax.jit(step, in_shardings=(shardings, shardings, rep, bsh, bsh), out_shardings=out_shardings,
                   donate_argnums=(1,) if donate else ())
  per_step_rows = mesh.size * (microbatch_size or 1)

  def accumulate(params, grad_sum, stats, batch, mask):
    rows = clipping_lib.leading_size(batch)
    if rows == 0 or rows % per_step_rows:
      raise ValueError(
          f"batch rows must be a positive multiple of mesh.size * microbatch_size = {per_step_rows} "
          f"(pad with masked rows), got {rows}.")
    if tuple(jnp.shape(mask)) != (rows,):
      raise ValueError(f"mask must have shape ({rows},) to match the batch, got {tuple(jnp.shape(mask))}.")
    return jitted(params, grad_sum, stats, batch, mask)

  accumulate.jitted = jitted
  return accumulate


def make_privatize_fn(shardings: PyTree, *, clip_norm: float) -> Callable[..., PyTree]:
  """A jitted ``privatize(grad_sum, key, noise_multiplier, expected_batch_size)``, sharded like params.

  Calls :func:`dpmega.noise.privatize` once on the whole reduced sum: one
  Gaussian draw of std ``noise_multiplier * clip_norm`` per coordinate per
  logical step, divided by the expected batch size. The draw is the same
  whatever ``shardings`` (partitionable threefry). ``noise_multiplier`` and
  ``expected_batch_size`` are traced (one compilation for a whole schedule)
  and validated on the host before each call.

  Raises:
    RuntimeError: if ``jax_threefry_partitionable`` is off (see
      :func:`check_partitionable_rng`).
  """
  clipping_lib.validate_clip_norm(clip_norm)
  check_partitionable_rng()

  def fn(grad_sum, key, noise_multiplier, expected_batch_size):
    return noise_lib.privatize(grad_sum, key, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                               expected_batch_size=expected_batch_size)

  jitted = jax.jit(fn, out_shardings=shardings)

  def privatize(grad_sum, key, noise_multiplier, expected_batch_size):
    noise_lib.validate_noise_multiplier(noise_multiplier)
    noise_lib.validate_expected_batch_size(expected_batch_size)
    if not math.isfinite(float(clip_norm)) and float(noise_multiplier) != 0:
      raise ValueError(f"clip_norm must be finite when noise is added, got {clip_norm=}.")
    return jitted(grad_sum, key, jnp.float32(noise_multiplier), jnp.float32(expected_batch_size))

  privatize.jitted = jitted
  return privatize


def check_partitionable_rng() -> None:
  """Raises ``RuntimeError`` unless ``jax_threefry_partitionable`` is on.

  Without it, ``jax.random`` under ``jit`` may draw different numbers for
  different output shardings, and a run would not give the same update on 1
  and 8 devices.
  """
  if not jax.config.jax_threefry_partitionable:
    raise RuntimeError("jax_threefry_partitionable must be True for sharding-independent noise; "
                       "set jax.config.update('jax_threefry_partitionable', True).")


# ----------------------------------------------------------------------------- multi-host


class ProcessChunk(NamedTuple):
  """One fixed-shape chunk of this process's share of the global sample.

  Attributes:
    indices: ``[rows]`` int64 dataset indices to load (padding rows repeat a
      sampled index).
    mask: ``[rows]`` float32, 1 for real examples, 0 for padding.
    num_real: the number of real rows (they come first).
  """

  indices: np.ndarray
  mask: np.ndarray
  num_real: int


def process_slice(num_examples: int, *, process_index: int, process_count: int) -> tuple[int, int]:
  """``[start, stop)`` of this process's contiguous share of ``num_examples`` rows.

  The shares are balanced (sizes differ by at most one) and tile
  ``range(num_examples)`` exactly.
  """
  b = _check_int("num_examples", num_examples, 0)
  count = _check_int("process_count", process_count, 1)
  index = _check_int("process_index", process_index, 0, count - 1)
  base, extra = divmod(b, count)
  start = index * base + min(index, extra)
  return start, start + base + (index < extra)


def process_chunks(
    global_indices: np.ndarray,
    *,
    process_index: int,
    process_count: int,
    rows_multiple: int,
    max_multiples: int,
) -> tuple[ProcessChunk, ...]:
  """This process's share of a global sample, cut into chunks of the same shapes on every process.

  Every process computes the same global sample (a pure function of the
  shared secret and step, e.g. ``PoissonSampler(N, secret=s).indices_at(t, B)``),
  keeps the contiguous slice :func:`process_slice` gives it, and pads it to
  chunk sizes that depend only on ``len(global_indices)`` and
  ``process_count`` (:func:`dpmega.sampling.chunk_sizes` of the largest
  share), so every process makes the same number of chunks with the same
  shapes and the global arrays line up.

  Guarantee: over all processes, the real rows are exactly
  ``global_indices``, each once.

  Args:
    global_indices: the whole step's sampled indices (int, 1-D).
    process_index: this process, ``jax.process_index()``.
    process_count: ``jax.process_count()``.
    rows_multiple: rows of one micro-batch on this process, i.e.
      ``jax.local_device_count() * per_device_microbatch_size`` (chunk rows
      are multiples of it).
    max_multiples: micro-batches per chunk at most (one jitted call).

  Returns:
    Tuple of :class:`ProcessChunk` (empty if the sample is empty).
  """
  global_indices = np.asarray(global_indices)
  if global_indices.ndim != 1 or not np.issubdtype(global_indices.dtype, np.integer):
    raise ValueError(f"global_indices must be a 1-D int array, got shape {global_indices.shape} "
                     f"and dtype {global_indices.dtype}.")
  rows_multiple = _check_int("rows_multiple", rows_multiple, 1)
  max_multiples = _check_int("max_multiples", max_multiples, 1)
  b = len(global_indices)
  start, stop = process_slice(b, process_index=process_index, process_count=process_count)
  mine = global_indices[start:stop].astype(np.int64)
  largest_share = -(-b // process_count)
  sizes = sampling.chunk_sizes(largest_share, microbatch_size=rows_multiple, max_microbatches=max_multiples)
  fill = mine[0] if len(mine) else (global_indices[0] if b else 0)
  chunks, pos = [], 0
  for size in sizes:
    real = mine[pos:pos + size]
    pos += len(real)
    n = len(real)
    idx = np.concatenate([real, np.full((size - n,), fill, np.int64)])
    mask = np.zeros((size,), np.float32)
    mask[:n] = 1.0
    chunks.append(ProcessChunk(idx, mask, n))
  return tuple(chunks)


def process_poisson_chunks(
    secret: bytes,
    step: int,
    batch_size: int,
    dataset_size: int,
    *,
    process_index: int,
    process_count: int,
    rows_multiple: int,
    max_multiples: int,
) -> tuple[ProcessChunk, ...]:
  """:func:`process_chunks` of step ``step``'s global Poisson sample (``q = batch_size / dataset_size``).

  The global sample is :class:`dpmega.sampling.PoissonSampler`'s, the one the
  accountant is told about, so ``q`` is exact on any number of processes.
  ``secret`` is the run's root secret, the same on every process
  (:func:`broadcast_secret`).
  """
  sampler = sampling.PoissonSampler(dataset_size, secret=secret)
  return process_chunks(sampler.indices_at(step, batch_size), process_index=process_index,
                        process_count=process_count, rows_multiple=rows_multiple, max_multiples=max_multiples)


def local_device_count(mesh: Mesh) -> int:
  """How many of ``mesh``'s devices belong to this process."""
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def iterate_process_chunks(
    source: Any,
    global_indices: np.ndarray,
    mesh: Mesh,
    *,
    microbatch_size: int,
    max_microbatches: int,
) -> Iterator[sampling.Chunk]:
  """Reads this process's rows of a global sample, chunk by chunk, as host arrays.

  The multi-host twin of :func:`dpmega.sampling.iterate_chunks`: each process
  calls it with the SAME ``global_indices`` (the sampler's draw for the step),
  reads only its own share (:func:`process_chunks`) with ``source.take``, and
  gets chunks of the same shapes as every other process; pass each chunk's
  ``batch`` and ``mask`` (after any host-side preparation) to
  :func:`global_batch_from_process_local`. ``microbatch_size`` is per device.
  """
  chunks = process_chunks(global_indices, process_index=jax.process_index(), process_count=jax.process_count(),
                          rows_multiple=local_device_count(mesh) * _check_int("microbatch_size", microbatch_size, 1),
                          max_multiples=max_microbatches)
  for c in chunks:
    yield sampling.Chunk(source.take(c.indices), c.mask, c.num_real)


def to_host(tree: PyTree) -> PyTree:
  """Numpy copies of every leaf, gathering arrays sharded across processes (collective: call everywhere)."""
  from jax.experimental import multihost_utils  # noqa: PLC0415 - only needed here

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree_util.tree_map(get, tree)


def sync_processes(name: str) -> None:
  """A barrier across every process (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


def broadcast_secret(secret: bytes) -> bytes:
  """Process 0's ``secret`` on every process, sent over ``jax.distributed`` (collective: call everywhere).

  The secret travels as uint32 words through
  ``multihost_utils.broadcast_one_to_all`` -- never through a file, argv or
  the environment, where other users of the machines could read it. With one
  process it is returned as is.
  """
  secret = noise_lib.validate_secret(secret)
  if jax.process_count() == 1:
    return secret
  from jax.experimental import multihost_utils  # noqa: PLC0415

  words = multihost_utils.broadcast_one_to_all(noise_lib.secret_to_words(secret))
  return noise_lib.secret_from_words(np.asarray(words).astype(np.uint32))


def global_batch_from_process_local(local_batch: PyTree, mesh: Mesh) -> PyTree:
  """Global arrays sharded by :func:`batch_sharding` from each process's rows.

  Every process passes its own rows (the same count on every process); the
  global leading axis is ``rows * jax.process_count()``. On one process this
  is a plain ``device_put``.
  """
  sharding = batch_sharding(mesh)
  local_devices = local_device_count(mesh)

  def make(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % max(local_devices, 1):
      raise ValueError(f"each local batch leaf's leading axis must be a multiple of this process's "
                       f"{local_devices} mesh devices, got shape {x.shape}.")
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map(make, local_batch)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    cpu_collectives: str = "gloo",
    initialization_timeout: int = 300,
) -> None:
  """``jax.distributed.initialize`` (no arguments: auto-detect on TPU pods, SLURM, ...).

  Call it first, before any other JAX call. ``cpu_collectives`` picks the
  cross-process collectives of CPU devices (``"gloo"``, or ``"mpi"``); it is
  ignored on TPU and GPU.
  """
  if num_processes is not None:
    _check_int("num_processes", num_processes, 1)
  if process_id is not None:
    _check_int("process_id", process_id, 0, (num_processes or 2**31) - 1)
  if cpu_collectives not in ("gloo", "mpi", "none"):
    raise ValueError(f"cpu_collectives must be one of ('gloo', 'mpi', 'none'), got {cpu_collectives=!r}.")
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=initialization_timeout)
