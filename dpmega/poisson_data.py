"""``PoissonData``: the batches of a private loop, drawn the way the accountant assumes, and recorded.

One job: turn any indexable dataset (a dict of arrays, a :class:`dpmega.data.sources.ArraySource`, a TFDS or
Grain random-access source whose ``source[i]`` is one example's dict) into the steps of a DP-SGD loop:

* each step's batch is a Poisson sample (every example independently with probability ``q = B / N``), a
  pure function of a secret drawn from the OS CSPRNG (:class:`dpmega.PoissonSampler`);
* padded with masked rows to ONE fixed shape (one compilation), never truncated (dropping sampled examples
  would break the accounting): a batch larger than the padded size raises;
* each step comes with its secret noise key (:func:`dpmega.step_key`) and is recorded in a
  :class:`dpmega.Ledger` (scheme Poisson, the given sigma) when it is handed out, so :meth:`epsilon` is the
  epsilon of what ran, through dpmega's accountant.

A shuffled fixed-size epoch (``tf.data.shuffle().batch()``, ``jax.random.permutation``) is NOT what the
Poisson accountant assumes; an epsilon computed for Poisson sampling on such batches is wrong. Use this.

Edge cases:

=========================  ===================================================================
input                      behaviour
=========================  ===================================================================
Poisson draws 0 examples   an all-padding step (mask all 0): it is still noised and counted
b_t > padded size          ``RuntimeError`` (never truncated); odds below 1e-12 by default
padding rows               a copy of a real row (or row 0), mask 0
=========================  ===================================================================
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np

from dpmega import noise
from dpmega.accounting import Ledger, compute_epsilon
from dpmega.data.sources import ArraySource
from dpmega.flax_loop import MASK, STEP
from dpmega.private_grad import StepKey
from dpmega.sampling import PoissonSampler, SamplingScheme
from dpmega.validation import check_int, check_real


class Step(NamedTuple):
  """One logical step: the padded batch's row indices and its :class:`dpmega.StepKey` (secret key, mask, sigma, B)."""

  indices: np.ndarray
  key: StepKey


class _ItemSource:
  """``take`` over a source indexed one example at a time (TFDS ``data_source``, Grain)."""

  def __init__(self, source: Any):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    rows = [self._source[int(i)] for i in indices]
    return {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}


def as_source(data: Any) -> Any:
  """A random-access source (``len`` and ``take``) over ``data``; ValueError if it is not indexable."""
  if isinstance(data, Mapping):
    return ArraySource({k: np.asarray(v) if not isinstance(v, np.memmap) else v for k, v in data.items()})
  if hasattr(data, "take") and hasattr(data, "__len__") and not isinstance(data, np.ndarray):
    return data
  if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
    return _ItemSource(data)
  raise ValueError(f"data must be a dict of arrays or an indexable source (len and [i]), got {type(data).__name__}.")


def padded_size(expected_batch_size: float, dataset_size: int, multiple: int = 8) -> int:
  """A fixed batch shape a Poisson batch exceeds with probability below about 1e-12 (8 standard deviations).

  Example:
    >>> padded_size(128, 60000)
    232
  """
  q = expected_batch_size / dataset_size
  bound = expected_batch_size + 8.0 * math.sqrt(expected_batch_size * (1 - q)) + 8
  return int(min(dataset_size + multiple - 1, multiple * math.ceil(bound / multiple)))


class PoissonData:
  """Poisson-sampled, padded, fixed-shape steps over an indexable dataset, recorded in a ledger.

  Guarantee: step ``t``'s rows are a Poisson sample of rate ``q = expected_batch_size / N``, unpredictable
  without the secret, and every step handed out is recorded as ``(q, noise_multiplier, Poisson)`` before the
  caller can compute with it; ``epsilon(delta)`` is the accountant's epsilon of those steps.

  Args:
    data: a dict of equal-length arrays, or any source with ``len`` and ``take(indices)`` or ``[i]``.
    expected_batch_size: B, the expected batch size (pass the same to the private gradient), in [1, N].
    noise_multiplier: sigma, the one the private gradient uses (recorded in the ledger), >= 0.
    secret: the run's secret (>= 16 bytes); None draws one from the OS CSPRNG. Keep it like the model and
      never log it.
    batch_size: the fixed padded shape; None: :func:`padded_size`. Round it to your micro-batch size.
    ledger: a ledger to record into (e.g. restored); None: a new one.
    position: the next step index (for a resumed run).

  Example:
    >>> import numpy as np
    >>> data = PoissonData({"x": np.arange(1000.0)}, expected_batch_size=100, noise_multiplier=1.0)
    >>> batch = next(iter(data))
    >>> batch["x"].shape, batch["dp_step"].mask.shape, data.ledger.num_steps, len(data)
    ((184,), (184,), 1, 10)
  """

  def __init__(self, data: Any, *, expected_batch_size: float, noise_multiplier: float,
               secret: bytes | None = None, batch_size: int | None = None, ledger: Ledger | None = None,
               position: int = 0):
    self.source = as_source(data)
    self.dataset_size = check_int("dataset_size (len(data))", len(self.source), 1)
    self.expected_batch_size = check_int("expected_batch_size", expected_batch_size, 1, self.dataset_size,
                                         integral_floats=True)
    self.noise_multiplier = check_real("noise_multiplier", noise_multiplier, 0.0)
    if batch_size is None:
      batch_size = padded_size(self.expected_batch_size, self.dataset_size)
    self.batch_size = check_int("batch_size", batch_size, 1)
    self._secret = noise.secret_bytes() if secret is None else noise.validate_secret(secret)
    self.sampler = PoissonSampler(self.dataset_size, secret=self._secret, position=position)
    self.ledger = Ledger() if ledger is None else ledger

  def __repr__(self) -> str:  # never the secret
    return (f"PoissonData(N={self.dataset_size}, expected_batch_size={self.expected_batch_size}, "
            f"batch_size={self.batch_size}, noise_multiplier={self.noise_multiplier}, "
            f"position={self.sampler.position})")

  def __len__(self) -> int:
    """Steps per epoch: ``round(N / B)`` (an epoch in expectation; each example is in about one batch)."""
    return max(1, round(self.dataset_size / self.expected_batch_size))

  def next_step(self) -> Step:
    """The next step's padded indices, mask and noise key; records the step in the ledger."""
    t = self.sampler.position
    idx = self.sampler.sample(self.expected_batch_size)
    if len(idx) > self.batch_size:
      raise RuntimeError(
          f"step {t}: the Poisson batch has {len(idx)} examples, more than batch_size={self.batch_size}; "
          f"dropping some would break the accounting: pass a larger batch_size.")
    mask = np.zeros((self.batch_size,), np.float32)
    mask[:len(idx)] = 1.0
    fill = idx[0] if len(idx) else 0
    padded = np.concatenate([idx, np.full((self.batch_size - len(idx),), fill, np.int64)])
    self.ledger.record(batch_size=self.expected_batch_size, dataset_size=self.dataset_size,
                       noise_multiplier=self.noise_multiplier, scheme=SamplingScheme.POISSON)
    return Step(padded, StepKey(noise.step_key(self._secret, t), mask, noise_multiplier=self.noise_multiplier,
                                expected_batch_size=self.expected_batch_size))

  def steps(self, num_steps: int | None = None) -> Iterator[Step]:
    """``num_steps`` steps (default: one epoch, ``len(self)``) as :class:`Step` ``(indices, key)``.

    Pass ``key`` as the private gradient's ``key=``: it carries the mask and the recorded sigma and B.
    """
    for _ in range(len(self) if num_steps is None else check_int("num_steps", num_steps, 0)):
      yield self.next_step()

  def batches(self, num_steps: int | None = None) -> Iterator[dict[str, Any]]:
    """Like :meth:`steps`, as batch dicts read from the source, with the step's key under ``"dp_step"``."""
    for step in self.steps(num_steps):
      batch = dict(self.source.take(step.indices))
      batch[STEP] = step.key
      yield batch

  def __getitem__(self, name: str) -> np.ndarray:
    """The column ``name`` of a dict-of-arrays dataset (so code indexing ``train_ds['image'][rows]`` keeps working)."""
    if not isinstance(self.source, ArraySource):
      raise TypeError(f"column access needs a dict-of-arrays dataset, got a {type(self.source).__name__}.")
    return self.source.arrays[name]

  def __iter__(self) -> Iterator[dict[str, Any]]:
    """One epoch of :meth:`batches`."""
    return self.batches()

  def epsilon(self, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of every step handed out so far (:func:`dpmega.compute_epsilon`)."""
    return compute_epsilon(self.ledger, delta, accountant)


def eval_batches(data: Any, batch_size: int) -> Iterator[dict[str, Any]]:
  """Every example once, in order, in fixed-shape batches; the last is padded, with ``"dp_mask"``.

  For evaluating a private model: no sampling, no key, no ledger (evaluation on held-out data releases
  nothing about the training set).

  Example:
    >>> import numpy as np
    >>> [b["dp_mask"].tolist() for b in eval_batches({"x": np.arange(5.0)}, 3)]
    [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
  """
  source = as_source(data)
  batch_size = check_int("batch_size", batch_size, 1)
  n = len(source)
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n), dtype=np.int64)
    mask = np.zeros((batch_size,), np.float32)
    mask[:len(idx)] = 1.0
    batch = dict(source.take(np.concatenate([idx, np.full((batch_size - len(idx),), idx[0], np.int64)])))
    batch[MASK] = mask
    yield batch
