"""Device meshes, parameter sharding rules, and multi-host batches and start-up.

Everything here is JAX's own machinery: a :class:`jax.sharding.Mesh` with a
``data`` axis and an ``fsdp`` axis, :class:`~jax.sharding.NamedSharding`,
``jax.make_array_from_process_local_data`` for multi-host batches and
``jax.distributed`` for multi-host start-up. The private step that runs on a
mesh -- per-device clipping under ``jax.shard_map``, the ``psum`` /
``psum_scatter`` reduction, the one noise draw -- is
:mod:`dpmega.train.step`; the chunker that gives each process its share of a
step's sample is :func:`dpmega.sampling.iterate_chunks`.

Guarantees:

* :func:`fsdp_spec` is a function of a leaf's shape alone, so an optimizer
  state is sharded exactly like its parameters.
* :func:`check_partitionable_rng` (run when the trainer builds its update):
  with ``jax_threefry_partitionable`` the noise drawn does not depend on the
  output sharding, so 1 device and 8 devices add the same noise.
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
several processes, a mesh that  ``ValueError``: every process feeds its share
leaves out some devices         of each batch, so every device is in the mesh
==============================  ================================================
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpmega import noise as noise_lib
from dpmega.validation import check_int

PyTree = Any

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"

# Leaves with fewer elements stay replicated under FSDP (2^18 floats = 1 MiB).
DEFAULT_MIN_SHARD_SIZE = 2**18


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
      check_int("data", self.data, 1)
    check_int("fsdp", self.fsdp, 1)
    check_int("min_shard_size", self.min_shard_size, 0)

  def shape(self, num_devices: int) -> tuple[int, int]:
    """``(data, fsdp)`` for ``num_devices`` devices; ``ValueError`` if they do not fit."""
    num_devices = check_int("num_devices", num_devices, 1)
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


def local_device_count(mesh: Mesh) -> int:
  """How many of ``mesh``'s devices belong to this process."""
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


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

  def check(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % max(local_devices, 1):
      raise ValueError(f"each local batch leaf's leading axis must be a multiple of this process's "
                       f"{local_devices} mesh devices, got shape {x.shape}.")
    return x

  local_batch = jax.tree_util.tree_map(check, local_batch)
  if jax.process_count() == 1:
    # The same arrays; one device_put of the whole tree costs a third of per-leaf make_array_* calls, per chunk.
    return jax.device_put(local_batch, sharding)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


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
    check_int("num_processes", num_processes, 1)
  if process_id is not None:
    check_int("process_id", process_id, 0, (num_processes or 2**31) - 1)
  if cpu_collectives not in ("gloo", "mpi", "none"):
    raise ValueError(f"cpu_collectives must be one of ('gloo', 'mpi', 'none'), got {cpu_collectives=!r}.")
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=initialization_timeout)
