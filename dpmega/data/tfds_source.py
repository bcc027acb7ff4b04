"""TFDS random-access data sources (``tfds.data_source``) as samplers' sources.

``tfds.data_source(name, split=...)`` reads ArrayRecord files by index with no
TensorFlow; :class:`TfdsSource` adapts it to :class:`RandomAccessSource`
(``len`` + ``take(indices)`` -> dict of stacked NumPy arrays), so the Poisson
and fixed-size samplers can draw from it like from in-memory arrays.
Needs the ``tfds`` extra (``pip install dpmega[tfds]``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np


class TfdsSource:
  """A TFDS (or any ``len`` + ``__getitem__``) random-access source as a :class:`RandomAccessSource`.

  Args:
    data_source: e.g. ``tfds.data_source("mnist", split="train")``.
    features: the feature names to keep (default: all); each must be an array
      (or scalar) of a fixed shape across examples.
    transform: optional ``example -> example`` applied to each record first
      (e.g. to rename or cast features).
  """

  def __init__(self, data_source: Any, *, features: Sequence[str] | None = None,
               transform: Callable[[dict], dict] | None = None):
    self._source = data_source
    self._features = None if features is None else tuple(features)
    self._transform = transform
    self._batched = hasattr(data_source, "__getitems__")

  def __len__(self) -> int:
    return len(self._source)

  def _records(self, keys: list[int]) -> list[dict]:
    if self._batched:
      try:
        return list(self._source.__getitems__(keys))
      except TypeError:  # some TFDS sources (mock data) lack a working batched read
        self._batched = False
    return [self._source[k] for k in keys]

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, dtype=np.int64)
    n = len(self)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      raise IndexError(f"indices must be in [0, {n}), got range [{indices.min()}, {indices.max()}].")
    records = self._records([int(i) for i in indices])
    if self._transform is not None:
      records = [self._transform(r) for r in records]
    names = self._features if self._features is not None else (tuple(records[0]) if records else ())
    if not records:
      return {k: np.zeros((0,)) for k in names}
    missing = [k for k in names if k not in records[0]]
    if missing:
      raise KeyError(f"features {missing} are not in the records, which have {sorted(records[0])}.")
    return {k: np.stack([np.asarray(r[k]) for r in records]) for k in names}


def tfds_source(name: str, split: str, *, data_dir: str | None = None, features: Sequence[str] | None = None,
                transform: Callable[[dict], dict] | None = None) -> TfdsSource:
  """``TfdsSource(tfds.data_source(name, split=split, data_dir=data_dir), ...)``."""
  try:
    import tensorflow_datasets as tfds  # noqa: PLC0415 - optional dependency
  except ImportError as e:
    raise ImportError("tfds_source needs tensorflow-datasets: pip install 'dpmega[tfds]'.") from e
  return TfdsSource(tfds.data_source(name, split=split, data_dir=data_dir), features=features,
                    transform=transform)
