"""What the vendored Flax MNIST examples use instead of TFDS, TensorFlow and TensorBoard (none installed here).

* :func:`load`: generated MNIST-shaped data: ``image`` float32 ``[n, 28, 28, 1]`` in [0, 1] (already divided
  by 255, as the examples do), ``label`` int32 in [0, 10); each class is a fixed random stroke template plus
  pixel noise and a random shift, so a CNN learns it in a few hundred steps but not in one.
* :class:`Batches`: stands in for ``ds.shuffle(1024).batch(batch_size, drop_remainder=True)`` and its
  ``as_numpy_iterator()``.
* :data:`tensorboard`: ``tensorboard.SummaryWriter`` that keeps the scalars in memory (``writer.scalars``).

The sizes come from the environment (``MNIST_SWAP_TRAIN``, ``MNIST_SWAP_TEST``; defaults 4096 and 1024), so
the unmodified example code (``get_datasets()`` takes no size) can be run small in CI.
"""

from __future__ import annotations

import os
import types

import numpy as np


def _make(n: int, seed: int, templates: np.ndarray) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.int32)
  images = templates[labels]
  shifts = rng.integers(-2, 3, (n, 2))
  images = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(images, shifts)])
  images = np.clip(images + 0.35 * rng.normal(size=images.shape), 0.0, 1.0)
  return {"image": images[..., None].astype(np.float32), "label": labels}


def load(raw: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """``(train, test)`` dicts of arrays, MNIST-shaped, normalized to [0, 1] (``raw``: uint8 in [0, 255], as TFDS)."""
  rng = np.random.default_rng(1234)
  templates = np.zeros((10, 28, 28))
  for c in range(10):  # a few random strokes per class
    for _ in range(4):
      r, s = rng.integers(4, 24, 2)
      if rng.random() < 0.5:
        templates[c, r:r + 2, max(s - 8, 2):s + 8] = 1.0
      else:
        templates[c, max(r - 8, 2):r + 8, s:s + 2] = 1.0
  n_train = int(os.environ.get("MNIST_SWAP_TRAIN", 4096))
  n_test = int(os.environ.get("MNIST_SWAP_TEST", 1024))
  train, test = _make(n_train, 0, templates), _make(n_test, 1, templates)
  if raw:
    for d in (train, test):
      d["image"] = np.round(d["image"] * 255).astype(np.uint8)
  return train, test


class Batches:
  """Fixed-size batches of a dict of arrays, shuffled per pass or in order, the incomplete one dropped."""

  def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, shuffle: bool = False, seed: int = 0):
    self.arrays, self.batch_size, self.shuffle = arrays, batch_size, shuffle
    self._rng = np.random.default_rng(seed)

  def as_numpy_iterator(self):
    n = len(self.arrays["label"])
    order = self._rng.permutation(n) if self.shuffle else np.arange(n)
    for start in range(0, n - self.batch_size + 1, self.batch_size):
      idx = order[start:start + self.batch_size]
      yield {k: v[idx] for k, v in self.arrays.items()}


class SummaryWriter:
  """``flax.metrics.tensorboard.SummaryWriter`` without TensorBoard: scalars kept in ``self.scalars``."""

  def __init__(self, log_dir: str):
    self.log_dir = log_dir
    self.scalars: dict[str, list[tuple[int, float]]] = {}

  def hparams(self, hparams: dict) -> None:
    self.hparams_ = dict(hparams)

  def scalar(self, tag: str, value, step: int) -> None:
    self.scalars.setdefault(tag, []).append((int(step), float(value)))

  def flush(self) -> None:
    pass


tensorboard = types.SimpleNamespace(SummaryWriter=SummaryWriter)
