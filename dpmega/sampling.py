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
step (:func:`chunk_sizes`): full chunks of ``max_microbatches * m`` examples
and one last chunk rounded up to ``m * 2^j`` examples with masked padding rows,
so a whole run compiles at most ``1 + log2(max_microbatches)`` shapes whatever
the batch sizes drawn (:func:`chunk_shapes`).

Edge cases (mirrored by ``tests/test_sampling.py``):

=========================  =================================================
input                      behaviour
=========================  =================================================
Poisson draws 0 examples   no chunks; the step still adds noise and counts
``B_t == N`` (Poisson)     ``q = 1``: every example, every step
``B_t > N`` or ``B_t<=0``  ``ValueError`` naming ``batch_size``
padding rows               mask 0; their data repeats a real row of the chunk
=========================  =================================================
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterator, NamedTuple

import numpy as np

from dpmega import noise
from dpmega.accounting import SamplingScheme
from dpmega.data.sources import RandomAccessSource


def _check_int(name: str, value: Any, lo: int, hi: float = math.inf) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {name}={value!r}.")
  if not lo <= value <= hi:
    raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {name}={value!r}.")
  return int(value)


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
    self.dataset_size = _check_int("dataset_size", dataset_size, 1)
    self._secret = noise.secret_bytes() if secret is None else noise.validate_secret(secret)
    self.generation = _check_int("generation", generation, 0, 2**63 - 1)
    self.position = _check_int("position", position, 0)

  def __repr__(self) -> str:  # never the secret
    return f"{type(self).__name__}(dataset_size={self.dataset_size}, generation={self.generation}, " \
           f"position={self.position})"

  def _rng(self, step: int) -> np.random.Generator:
    return _rng(self._secret, self.generation, _check_int("step", step, 0, 2**63 - 1))

  def _check_batch_size(self, batch_size: int) -> int:
    return _check_int("batch_size", batch_size, 1, self.dataset_size)

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
    self.position = _check_int("position", state.position, 0)


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


def sampler_from_state(state: SamplerState, *, secret: bytes,
                       generation: int = 0) -> PoissonSampler | WithoutReplacementSampler:
  """The sampler that continues ``state`` with the run's ``secret`` (from its checkpoint)."""
  return make_sampler(state.scheme, state.dataset_size, secret=secret, generation=generation,
                      position=state.position)


def chunk_shapes(microbatch_size: int, max_microbatches: int) -> tuple[int, ...]:
  """Every chunk size :func:`chunk_sizes` can return: ``m * 2^j`` up to ``m * k``, and ``m * k``."""
  m = _check_int("microbatch_size", microbatch_size, 1)
  k = _check_int("max_microbatches", max_microbatches, 1)
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
  b = _check_int("num_examples", num_examples, 0)
  shapes = chunk_shapes(microbatch_size, max_microbatches)
  full_size = shapes[-1]
  full, rem = divmod(b, full_size)
  sizes = [full_size] * full
  if rem:
    sizes.append(next(s for s in shapes if s >= rem))
  return tuple(sizes)


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
                   max_microbatches: int) -> Iterator[Chunk]:
  """Reads the examples at ``indices`` chunk by chunk (never the whole batch at once).

  Memory is bounded by one chunk of ``microbatch_size * max_microbatches``
  examples whatever ``len(indices)``; padding rows repeat the chunk's first
  real example and are masked out.
  """
  indices = np.asarray(indices, dtype=np.int64)
  start = 0
  for size in chunk_sizes(len(indices), microbatch_size=microbatch_size, max_microbatches=max_microbatches):
    real = indices[start:start + size]
    start += len(real)
    n = len(real)
    if n < size:
      real = np.concatenate([real, np.full((size - n,), real[0], np.int64)])
    mask = np.zeros((size,), np.float32)
    mask[:n] = 1.0
    yield Chunk(source.take(real), mask, n)
