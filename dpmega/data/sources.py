"""Random-access data sources: the only thing the samplers need from data.

A source is anything with ``len(source)`` and ``source.take(indices)``
returning a dict of NumPy arrays whose leading axis is ``len(indices)``.
Sources live on the host; only micro-batches are sent to devices.
"""

from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class RandomAccessSource(Protocol):
  """N examples readable in any order by index."""

  def __len__(self) -> int:
    ...

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at ``indices`` (int64, any order, may repeat), stacked."""
    ...


class ArraySource:
  """A source over equal-length arrays: in memory or ``np.memmap`` (read lazily).

  Example:
    >>> import numpy as np
    >>> src = ArraySource({"x": np.arange(10.0), "y": np.arange(10) % 2})
    >>> len(src), src.take(np.array([3, 1]))["x"].tolist()
    (10, [3.0, 1.0])
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    if not arrays:
      raise ValueError("arrays must hold at least one named array.")
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"arrays must all have the same length, got {lengths}.")
    self._arrays = dict(arrays)
    self._n = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._n

  @property
  def arrays(self) -> Mapping[str, np.ndarray]:
    return self._arrays

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self._n):
      raise IndexError(f"indices must be in [0, {self._n}), got range [{indices.min()}, {indices.max()}].")
    return {k: np.asarray(v[indices]) for k, v in self._arrays.items()}
