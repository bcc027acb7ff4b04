"""Random-access data sources: the only thing the samplers need from data.

A source is anything with ``len(source)`` and ``source.take(indices)``
returning a dict of NumPy arrays whose leading axis is ``len(indices)``.
Sources live on the host; only micro-batches are sent to devices.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping, Protocol, runtime_checkable

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

  def fingerprint(self) -> dict[str, Any]:
    """See :func:`fingerprint`: the whole content when small, else sampled rows plus the memmaps' files."""
    nbytes = sum(int(np.asarray(a).nbytes) for a in self._arrays.values())
    rows = None if nbytes <= FULL_HASH_BYTES else sample_rows(self._n)
    files = [file_identity(a.filename) for a in self._arrays.values()
             if isinstance(a, np.memmap) and a.filename]
    return {"size": self._n, "content": hash_arrays(self._arrays, rows),
            "coverage": "full" if rows is None else f"rows:{rows.size}", "files": files}


# Sources whose arrays total at most this many bytes are hashed whole; larger ones by evenly spaced rows
# (plus their files' identity): hashing a terabyte on every start would cost more than the run.
FULL_HASH_BYTES = 256 << 20
SAMPLED_ROWS = 4096


def sample_rows(n: int, limit: int = SAMPLED_ROWS) -> np.ndarray:
  """Up to ``limit`` evenly spaced row indices of ``range(n)``, first and last included (int64)."""
  if n <= limit:
    return np.arange(n, dtype=np.int64)
  return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def hash_arrays(arrays: Mapping[str, np.ndarray], rows: np.ndarray | None = None) -> str:
  """SHA-256 of every array's name, dtype, shape and bytes (of ``rows`` only, when given)."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = arrays[name]
    h.update(f"{name}|{np.dtype(a.dtype).str}|{tuple(a.shape)}|".encode())
    part = np.asarray(a if rows is None else a[rows])
    h.update(np.ascontiguousarray(part).tobytes())
  if rows is not None:
    h.update(np.ascontiguousarray(rows).tobytes())
  return h.hexdigest()


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
  """What identifies a file on this machine without reading it: path, size, modification time, inode."""
  st = os.stat(path)
  return {"path": os.path.realpath(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def fingerprint(source: Any) -> dict[str, Any]:
  """What identifies a source's CONTENT, for checkpoints: ``{"size", "content", "coverage", "files"}``.

  ``size`` and ``content`` (a SHA-256) decide whether two sources are the same
  data; ``coverage`` says how much of it the hash read (``"full"``, or
  ``"rows:K"`` for K evenly spaced rows of a large source); ``files`` is the
  identity of the files behind it (path, size, mtime, inode), which may change
  without the content changing (a copy). A source may define its own
  ``fingerprint()`` returning the same keys; otherwise up to
  :data:`SAMPLED_ROWS` evenly spaced examples are read through ``take``.

  Example:
    >>> a = fingerprint(ArraySource({"x": np.arange(4.0)}))
    >>> b = fingerprint(ArraySource({"x": np.array([0.0, 1.0, 2.0, 3.5])}))
    >>> a["size"], a["coverage"], a["content"] == b["content"]
    (4, 'full', False)
  """
  own = getattr(source, "fingerprint", None)
  if callable(own):
    return own()
  n = len(source)
  rows = sample_rows(n)
  return {"size": n, "content": hash_arrays(source.take(rows), rows),
          "coverage": "full" if rows.size == n else f"rows:{rows.size}", "files": []}
