"""Batch samplers over a random-access source, and fixed-shape micro-batch chunks.

Two samplers, each matching one sampling scheme of the accountant:

* :class:`PoissonSampler` -- every example is in step ``t``'s batch
  independently with probability ``q_t = B_t / N``. Drawn exactly and in
  ``O(b_t)`` Python-free work: the batch size is ``Binomial(N, q_t)``, then a
  uniform subset of that size (together these have the Poisson distribution).
* :class:`WithoutReplacementSampler` -- exactly ``B_t`` distinct examples,
  uniformly at random (accounted as sampling without replacement).

Guarantees: the indices of step ``t`` are a pure function of ``(secret,
generation, t, B_t, N)`` -- a sampler's whole state is its secret, generation
and :class:`SamplerState` ``(scheme, N, position)`` -- so a restored sampler
draws exactly the batches an uninterrupted one would have. Without the secret
they are unpredictable: step ``t`` is seeded by ``HMAC-SHA256(secret,
"sampler" | generation | t)`` (:func:`dpmega.noise.sampler_entropy`), a
stream independent of the noise's; the default secret is fresh from the OS
CSPRNG (:func:`dpmega.noise.secret_bytes`). Poisson membership that anyone
could recompute would be public, and the accountant's amplification by
sampling assumes it is not.

The realized batch is cut into chunks of whole micro-batches for the jitted
step by ONE chunker for one or many processes (:func:`chunk_indices`,
:func:`iterate_chunks`): each process takes its contiguous share of the step's
global sample; full chunks of ``max_microbatches * m`` examples and one last
chunk rounded up to ``m * 2^j`` examples with masked padding rows, sized by
the largest share so every process has the same shapes; a whole run compiles
at most ``1 + log2(max_microbatches)`` shapes whatever the batch sizes drawn
(:func:`chunk_shapes`).

Edge cases (mirrored by ``tests/test_sampling.py``):

=========================  =================================================
input                      behaviour
=========================  =================================================
Poisson draws 0 examples   no chunks; the step still adds noise and counts
``B_t == N`` (Poisson)     ``q = 1``: every example, every step
``B_t > N`` or ``B_t<=0``  ``ValueError`` naming ``batch_size``
padding rows               mask 0; they repeat the step's first sampled index
fewer rows than processes  a process may get only padding rows (mask 0):
                           shapes stay the same on every process
=========================  =================================================
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Iterator, NamedTuple

import numpy as np

from dpmega import noise
from dpmega.data.sources import RandomAccessSource
from dpmega.validation import check_int


class SamplingScheme(enum.Enum):
  """How each logical batch is drawn; decides the accountant's event and the neighbouring relation.

  The accountant (:mod:`dpmega.accounting`) maps a scheme to its dp-accounting
  event and relation; what a scheme means for the noise is here:
  :attr:`relation_label` and :attr:`sensitivity`.

  Example:
    >>> SamplingScheme.WITHOUT_REPLACEMENT.relation_label, SamplingScheme.WITHOUT_REPLACEMENT.sensitivity
    ('replace-one', 2.0)
  """

  POISSON = "poisson"
  WITHOUT_REPLACEMENT = "without_replacement"

  @property
  def relation_label(self) -> str:
    """``"add/remove-one"`` (Poisson) or ``"replace-one"`` (without replacement), printed next to every ε."""
    return "add/remove-one" if self is SamplingScheme.POISSON else "replace-one"

  @property
  def sensitivity(self) -> float:
    """L2 sensitivity of the clipped sum under this scheme's relation, in units of C.

    1 for add/remove-one (one clipped gradient appears or not), 2 for
    replace-one (a clipped gradient ``g`` may become ``-g``). The accountant's
    noise multiplier is ``σ / sensitivity`` and ``δ_tail`` shifts the noise by
    ``sensitivity / σ`` standard deviations: both read it from here.
    """
    return 1.0 if self is SamplingScheme.POISSON else 2.0


def as_scheme(value: Any, name: str = "scheme") -> SamplingScheme:
  """``value`` as a :class:`SamplingScheme` (``"poisson"``, ``"without-replacement"``, ... or the enum)."""
  if isinstance(value, SamplingScheme):
    return value
  try:
    return SamplingScheme(str(value).lower().replace("-", "_"))
  except ValueError:
    raise ValueError(
        f"{name} must be one of {[s.value for s in SamplingScheme]}, got {name}={value!r}.") from None


def _rng(secret: bytes, generation: int, step: int) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence(noise.sampler_entropy(secret, step, generation=generation)))


def _uniform_subset(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """``size`` distinct indices of ``range(n)``, uniformly at random, sorted (int64)."""
  if size == 0:
    return np.zeros((0,), np.int64)
  if size == n:
    return np.arange(n, dtype=np.int64)
  idx = rng.choice(n, size=size, replace=False, shuffle=False)
  idx = np.asarray(idx, dtype=np.int64)
  idx.sort()
  return idx


@dataclasses.dataclass(frozen=True)
class SamplerState:
  """The sampler's public state: checkpoint this (with the secret, which it does not hold).

  Attributes:
    scheme: the sampling scheme (it must match the ledger's).
    dataset_size: N, the number of examples sampled from.
    position: the number of batches drawn so far (= next step index).
  """

  scheme: SamplingScheme
  dataset_size: int
  position: int

  def to_dict(self) -> dict[str, Any]:
    return {"scheme": self.scheme.value, "dataset_size": self.dataset_size, "position": self.position}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "SamplerState":
    return cls(SamplingScheme(d["scheme"]), int(d["dataset_size"]), int(d["position"]))


class _Sampler:
  """Shared state handling; subclasses define ``scheme`` and ``indices_at``.

  Args:
    dataset_size: N.
    secret: the root secret (>= 16 bytes) the batches are a function of; None
      (default) draws a fresh one from the OS CSPRNG. For a reproducible,
      NON-private run pass ``dpmega.noise.insecure_secret_from_seed(seed)``.
    generation: the trainer's recomputation counter (see
      :func:`dpmega.noise.step_key`); a new generation draws new batches.
    position: the next step to draw.
  """

  scheme: SamplingScheme

  def __init__(self, dataset_size: int, *, secret: bytes | None = None, generation: int = 0, position: int = 0):
    self.dataset_size = check_int("dataset_size", dataset_size, 1)
    self._secret = noise.secret_bytes() if secret is None else noise.validate_secret(secret)
    self.generation = check_int("generation", generation, 0, 2**63 - 1)
    self.position = check_int("position", position, 0)

  def __repr__(self) -> str:  # never the secret
    return f"{type(self).__name__}(dataset_size={self.dataset_size}, generation={self.generation}, " \
           f"position={self.position})"

  def _rng(self, step: int) -> np.random.Generator:
    return _rng(self._secret, self.generation, check_int("step", step, 0, 2**63 - 1))

  def _check_batch_size(self, batch_size: int) -> int:
    return check_int("batch_size", batch_size, 1, self.dataset_size)

  def indices_at(self, step: int, batch_size: int) -> np.ndarray:
    raise NotImplementedError

  def sample(self, batch_size: int) -> np.ndarray:
    """The sorted int64 indices of the next batch (expected size ``batch_size``); advances."""
    idx = self.indices_at(self.position, batch_size)
    self.position += 1
    return idx

  @property
  def state(self) -> SamplerState:
    return SamplerState(self.scheme, self.dataset_size, self.position)

  def restore(self, state: SamplerState) -> None:
    """Continues from ``state``; raises ``ValueError`` if it is another sampler's state.

    The state does not hold the secret: build this sampler with the run's
    secret (kept in its checkpoint) to draw the run's batches.
    """
    mine = (self.scheme, self.dataset_size)
    theirs = (state.scheme, state.dataset_size)
    if mine != theirs:
      raise ValueError(
          f"sampler state is for (scheme, dataset_size)={tuple(map(str, theirs))}, "
          f"but this run has {tuple(map(str, mine))}.")
    self.position = check_int("position", state.position, 0)


class PoissonSampler(_Sampler):
  """Poisson sampling: each example independently with probability ``q = B / N``.

  Example:
    >>> s = PoissonSampler(1000)  # a fresh secret from the OS CSPRNG
    >>> idx = s.sample(100)
    >>> 60 < len(idx) < 140, s.position, bool((idx[1:] > idx[:-1]).all())
    (True, 1, True)
  """

  scheme = SamplingScheme.POISSON

  def indices_at(self, step: int, batch_size: int) -> np.ndarray:
    """Step ``step``'s batch for expected batch size ``batch_size`` (pure in its inputs)."""
    batch_size = self._check_batch_size(batch_size)
    rng = self._rng(step)
    q = batch_size / self.dataset_size
    count = int(rng.binomial(self.dataset_size, q))
    return _uniform_subset(rng, self.dataset_size, count)


class WithoutReplacementSampler(_Sampler):
  """Exactly ``B`` distinct examples per step, uniformly at random.

  Example:
    >>> len(WithoutReplacementSampler(1000).sample(100))
    100
  """

  scheme = SamplingScheme.WITHOUT_REPLACEMENT

  def indices_at(self, step: int, batch_size: int) -> np.ndarray:
    batch_size = self._check_batch_size(batch_size)
    return _uniform_subset(self._rng(step), self.dataset_size, batch_size)


def make_sampler(scheme: SamplingScheme | str, dataset_size: int, *, secret: bytes | None = None,
                 generation: int = 0, position: int = 0) -> PoissonSampler | WithoutReplacementSampler:
  """The sampler for ``scheme`` ("poisson" or "without_replacement"); ``secret`` None draws a fresh one."""
  try:
    scheme = SamplingScheme(scheme)
  except ValueError:
    raise ValueError(
        f"sampling scheme must be one of {[s.value for s in SamplingScheme]}, got {scheme!r}.") from None
  cls = PoissonSampler if scheme == SamplingScheme.POISSON else WithoutReplacementSampler
  return cls(dataset_size, secret=secret, generation=generation, position=position)


def chunk_shapes(microbatch_size: int, max_microbatches: int) -> tuple[int, ...]:
  """Every chunk size :func:`chunk_sizes` can return: ``m * 2^j`` up to ``m * k``, and ``m * k``."""
  m = check_int("microbatch_size", microbatch_size, 1)
  k = check_int("max_microbatches", max_microbatches, 1)
  sizes = {m * k}
  j = 1
  while j < k:
    sizes.add(m * j)
    j *= 2
  return tuple(sorted(sizes))


def chunk_sizes(num_examples: int, *, microbatch_size: int, max_microbatches: int) -> tuple[int, ...]:
  """How ``num_examples`` rows are cut into padded chunks of whole micro-batches.

  Args:
    num_examples: the realized batch size b (>= 0).
    microbatch_size: m, examples per micro-batch (the memory bound).
    max_microbatches: k, micro-batches per chunk (one jitted call scans over them).

  Returns:
    Chunk sizes: ``b // (m k)`` chunks of ``m k``, then (if rows remain) one of
    the smallest size in :func:`chunk_shapes` that holds them. Their sum is at
    least b and exceeds it by less than ``max(m, remainder)``.
  """
  b = check_int("num_examples", num_examples, 0)
  shapes = chunk_shapes(microbatch_size, max_microbatches)
  full_size = shapes[-1]
  full, rem = divmod(b, full_size)
  sizes = [full_size] * full
  if rem:
    sizes.append(next(s for s in shapes if s >= rem))
  return tuple(sizes)


def process_slice(num_examples: int, *, process_index: int, process_count: int) -> tuple[int, int]:
  """``[start, stop)`` of one process's contiguous share of ``num_examples`` rows.

  The shares are balanced (sizes differ by at most one) and tile
  ``range(num_examples)`` exactly, in process order.

  Example:
    >>> [process_slice(5, process_index=p, process_count=2) for p in range(2)]
    [(0, 3), (3, 5)]
  """
  b = check_int("num_examples", num_examples, 0)
  count = check_int("process_count", process_count, 1)
  index = check_int("process_index", process_index, 0, count - 1)
  base, extra = divmod(b, count)
  start = index * base + min(index, extra)
  return start, start + base + (index < extra)


class IndexChunk(NamedTuple):
  """The dataset indices of one fixed-shape chunk of a process's share of a step's sample.

  Attributes:
    indices: ``[size]`` int64 dataset indices to read; padding rows repeat
      the step's first sampled index.
    mask: ``[size]`` float32, 1 for real examples, 0 for padding.
    num_real: the number of real rows (they come first).
  """

  indices: np.ndarray
  mask: np.ndarray
  num_real: int


def chunk_indices(indices: np.ndarray, *, microbatch_size: int, max_microbatches: int, process_index: int = 0,
                  process_count: int = 1) -> tuple[IndexChunk, ...]:
  """One process's share of a step's sample, cut into chunks whose shapes are the same on every process.

  Every process holds the same global sample (a pure function of the shared
  secret and the step), keeps the contiguous slice :func:`process_slice`
  gives it, and cuts it into the chunk sizes :func:`chunk_sizes` gives the
  LARGEST share, so every process makes the same number of chunks with the
  same shapes and the global arrays line up. One process
  (``process_count=1``, the default) is the case where the share is the
  whole sample.

  Fill rule (one, for any process count): padding rows have mask 0 and repeat
  the step's first sampled index ``indices[0]`` -- a row of the dataset, so
  the loss sees valid data; the mask makes its contribution exactly zero
  (invariant 4).

  Guarantee: over all processes, the real rows are exactly ``indices``, each
  once, in order; an empty sample gives no chunks on any process.

  Args:
    indices: the step's whole sampled indices (1-D ints).
    microbatch_size: rows of one micro-batch on this process (for a mesh, the
      process's devices times the per-device micro-batch); chunk sizes are
      multiples of it.
    max_microbatches: micro-batches per chunk at most (one jitted call).
    process_index: this process, ``jax.process_index()``.
    process_count: ``jax.process_count()``.

  Example:
    >>> [c.indices.tolist() for c in chunk_indices(np.array([3, 8, 9]), microbatch_size=2, max_microbatches=1)]
    [[3, 8], [9, 3]]
  """
  indices = np.asarray(indices)
  if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer) or indices.size == 0):
    raise ValueError(f"indices must be a 1-D int array, got shape {indices.shape} and dtype {indices.dtype}.")
  indices = indices.astype(np.int64)
  b = len(indices)
  start, stop = process_slice(b, process_index=process_index, process_count=process_count)
  mine = indices[start:stop]
  sizes = chunk_sizes(-(-b // process_count), microbatch_size=microbatch_size, max_microbatches=max_microbatches)
  chunks, pos = [], 0
  for size in sizes:
    real = mine[pos:pos + size]
    pos += len(real)
    n = len(real)
    mask = np.zeros((size,), np.float32)
    mask[:n] = 1.0
    chunks.append(IndexChunk(np.concatenate([real, np.full((size - n,), indices[0], np.int64)]), mask, n))
  return tuple(chunks)


class Chunk(NamedTuple):
  """One fixed-shape piece of a logical batch, ready for the jitted step.

  Attributes:
    batch: dict of arrays with leading axis ``size`` (padding rows included).
    mask: ``[size]`` float32, 1 for real examples and 0 for padding.
    num_real: the number of real (unmasked) rows, which come first.
  """

  batch: dict[str, np.ndarray]
  mask: np.ndarray
  num_real: int


def iterate_chunks(source: RandomAccessSource, indices: np.ndarray, *, microbatch_size: int,
                   max_microbatches: int, process_index: int = 0, process_count: int = 1) -> Iterator[Chunk]:
  """Reads this process's rows of ``indices`` chunk by chunk (never the whole batch at once).

  The chunks are :func:`chunk_indices`'s (same arguments), read with
  ``source.take``. Memory is bounded by one chunk of ``microbatch_size *
  max_microbatches`` examples whatever ``len(indices)``. With several
  processes, each calls this with the SAME ``indices`` and reads only its own
  share; pass each chunk (after any host-side preparation) to
  :func:`dpmega.sharding.global_batch_from_process_local`.
  """
  for c in chunk_indices(indices, microbatch_size=microbatch_size, max_microbatches=max_microbatches,
                         process_index=process_index, process_count=process_count):
    yield Chunk(source.take(c.indices), c.mask, c.num_real)
