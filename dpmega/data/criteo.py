"""Criteo display-ads click logs as memory-mapped columns: the on-disk format and random access.

A directory written by :func:`dpmega.data.criteo_tsv.convert` (from the
released TSV files) holds three raw little-endian arrays next to a
``meta.json``:

===============  ===========  ==================================================
file             dtype/shape  content
===============  ===========  ==================================================
``label.bin``    uint8 [N]    the label
``int.bin``      int32 [N,13] the integer, ``INT_MISSING`` where empty
``cat.bin``      uint32[N,26] 32-bit FNV-1a hash of the raw bytes ('' if empty)
===============  ===========  ==================================================

Hashing into buckets happens at READ time (:class:`CriteoSource`), so the
number of buckets per feature is a model choice, not a conversion choice.
:class:`CriteoSource` reads only the requested rows of the memory maps, so it
works for files larger than memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from dpmega.data import sources
from dpmega.errors import UsageError

NUM_INT = 13
NUM_CAT = 26
NUM_FIELDS = 1 + NUM_INT + NUM_CAT
INT_MISSING = np.iinfo(np.int32).min
FORMAT_VERSION = 1

_FNV_OFFSET = np.uint32(2166136261)
_FNV_PRIME = np.uint32(16777619)


def fnv1a32(values: np.ndarray) -> np.ndarray:
  """32-bit FNV-1a hash of each byte string of an ``S`` array (any shape).

  Stable across processes, platforms and NumPy versions (unlike ``hash``).

  Example:
    >>> int(fnv1a32(np.array([b""]))[0]), int(fnv1a32(np.array([b"a"]))[0])
    (2166136261, 3826002220)
  """
  values = np.asarray(values)
  if values.dtype.kind != "S":
    raise ValueError(f"values must be a bytes ('S') array, got dtype {values.dtype}.")
  width = values.dtype.itemsize
  h = np.full(values.shape, _FNV_OFFSET, np.uint32)
  if width == 0:
    return h
  raw = np.ascontiguousarray(values).view(np.uint8).reshape(values.shape + (width,))
  for i in range(width):
    b = raw[..., i].astype(np.uint32)
    # 'S' arrays pad with NUL; text fields contain no NUL, so skipping NUL
    # bytes makes the hash independent of the padding width.
    h = np.where(b != 0, (h ^ b) * _FNV_PRIME, h)
  return h


def _fmix32(h: np.ndarray) -> np.ndarray:
  h = h ^ (h >> np.uint32(16))
  h = h * np.uint32(0x85EBCA6B)
  h = h ^ (h >> np.uint32(13))
  h = h * np.uint32(0xC2B2AE35)
  return h ^ (h >> np.uint32(16))


def bucketize(hashes: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
  """Maps ``[n, F]`` uint32 hashes to ``[n, F]`` int32 ids in ``[0, buckets[f])``.

  Each feature is mixed with its own salt (murmur3 finalizer) before the
  modulo, so equal raw values in two features land in unrelated buckets.
  """
  hashes = np.asarray(hashes, np.uint32)
  buckets = np.asarray(buckets, np.uint64)
  if hashes.ndim != 2 or hashes.shape[1] != buckets.size:
    raise ValueError(f"hashes must have shape [n, {buckets.size}], got {hashes.shape}.")
  salts = (np.arange(1, buckets.size + 1, dtype=np.uint64) * np.uint64(0x9E3779B9)).astype(np.uint32)
  mixed = _fmix32(hashes ^ salts)
  return (mixed.astype(np.uint64) % buckets).astype(np.int32)


def dense_transform(ints: np.ndarray) -> np.ndarray:
  """``log(1 + max(x, 0))`` as float32, 0 where missing (the DLRM convention)."""
  ints = np.asarray(ints)
  x = np.where(ints == INT_MISSING, 0, np.maximum(ints, 0)).astype(np.float64)
  return np.log1p(x).astype(np.float32)


def validate_buckets(buckets: int | Sequence[int], num_features: int = NUM_CAT,
                     name: str = "buckets") -> tuple[int, ...]:
  """``buckets`` as a tuple of ``num_features`` ints in ``[1, 2**32]``."""
  if isinstance(buckets, (int, np.integer)) and not isinstance(buckets, bool):
    buckets = (int(buckets),) * num_features
  buckets = tuple(buckets)
  if len(buckets) != num_features:
    raise ValueError(f"{name} must be an int or {num_features} ints (one per feature), got {len(buckets)}.")
  for b in buckets:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= 2**32:
      raise ValueError(f"{name} must be ints in [1, 2**32], got {b!r}.")
  return tuple(int(b) for b in buckets)


# ---------------------------------------------------------------------------
# The column store: memory maps and random access.


@dataclasses.dataclass(frozen=True)
class CriteoColumns:
  """The memory-mapped arrays of a converted directory (read-only, lazy)."""

  labels: np.ndarray
  ints: np.ndarray
  cats: np.ndarray
  meta: dict[str, Any]

  def __len__(self) -> int:
    return int(self.meta["rows"])


def open_columns(path: str | os.PathLike) -> CriteoColumns:
  """Opens a directory written by :func:`dpmega.data.criteo_tsv.convert` as read-only memory maps."""
  path = Path(path)
  meta_path = path / "meta.json"
  if not meta_path.exists():
    raise UsageError(f"{path} is not a converted Criteo directory (no meta.json; was the conversion interrupted?).")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != "dpmega-criteo" or meta.get("version") != FORMAT_VERSION:
    raise UsageError(f"{path}: unsupported format {meta.get('format')!r} version {meta.get('version')!r}.")
  n = int(meta["rows"])

  def mm(name, dtype, shape):
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    actual = (path / name).stat().st_size
    if actual != expected:
      raise UsageError(f"{path / name} has {actual} bytes, expected {expected} for {n} rows.")
    if expected == 0:
      return np.zeros(shape, dtype)
    return np.memmap(path / name, dtype=dtype, mode="r", shape=shape)

  return CriteoColumns(
      labels=mm("label.bin", "<u1", (n,)),
      ints=mm("int.bin", "<i4", (n, NUM_INT)),
      cats=mm("cat.bin", "<u4", (n, NUM_CAT)),
      meta=meta,
  )


class CriteoSource:
  """Random access to rows ``[start, stop)`` of a converted directory, as model inputs.

  ``take(indices)`` returns ``{"dense": float32 [n, 13]`` (:func:`dense_transform`),
  ``"sparse": int32 [n, 26]`` (:func:`bucketize` with ``buckets``),
  ``"label": float32 [n]}``. Reads touch only the requested rows of the memory
  maps, so the source works for files larger than memory; it satisfies
  :class:`dpmega.data.sources.RandomAccessSource`.

  Args:
    path: directory written by :func:`dpmega.data.criteo_tsv.convert` (or a :class:`CriteoColumns`).
    buckets: hash buckets per categorical feature (int: the same for all 26).
    start, stop: the row range this source exposes (e.g. a train/eval split).
  """

  def __init__(self, path: str | os.PathLike | CriteoColumns, buckets: int | Sequence[int], *,
               start: int = 0, stop: int | None = None):
    self.columns = path if isinstance(path, CriteoColumns) else open_columns(path)
    self.buckets = validate_buckets(buckets)
    n = len(self.columns)
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
      raise ValueError(f"start and stop must satisfy 0 <= start <= stop <= {n}, got {start=}, {stop=}.")
    self.start, self.stop = int(start), int(stop)

  def __len__(self) -> int:
    return self.stop - self.start

  def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, dtype=np.int64)
    n = len(self)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
      raise IndexError(f"indices must be in [0, {n}), got range [{indices.min()}, {indices.max()}].")
    rows = indices + self.start
    c = self.columns
    return {
        "dense": dense_transform(c.ints[rows]),
        "sparse": bucketize(c.cats[rows], self.buckets),
        "label": np.asarray(c.labels[rows], np.float32),
    }

  def fingerprint(self) -> dict[str, Any]:
    """What identifies the rows this source reads (:func:`dpmega.data.sources.fingerprint`).

    The raw columns of ``[start, stop)`` are hashed whole up to
    :data:`~dpmega.data.sources.FULL_HASH_BYTES`, else at evenly spaced rows;
    the conversion's ``meta.json`` and the buckets are hashed too (they decide
    what ``take`` returns).
    """
    c = self.columns
    cols = {"label": c.labels[self.start:self.stop], "int": c.ints[self.start:self.stop],
            "cat": c.cats[self.start:self.stop]}
    nbytes = sum(int(a.nbytes) for a in cols.values())
    rows = None if nbytes <= sources.FULL_HASH_BYTES else sources.sample_rows(len(self))
    digest = hashlib.sha256(sources.hash_arrays(cols, rows).encode())
    # The conversion's settings, not its input paths (a moved copy of the same data is the same data).
    decides = ("format", "version", "rows", "num_int", "num_cat", "int_missing", "cat_hash", "layout")
    digest.update(json.dumps({k: c.meta.get(k) for k in decides}, sort_keys=True, default=str).encode())
    digest.update(json.dumps(list(self.buckets)).encode())
    files = [sources.file_identity(a.filename) for a in (c.labels, c.ints, c.cats)
             if isinstance(a, np.memmap) and a.filename]
    return {"size": len(self), "content": digest.hexdigest(),
            "coverage": "full" if rows is None else f"rows:{rows.size}", "files": files}

  def labels(self) -> np.ndarray:
    """All labels of the range, float32 (for evaluation)."""
    return np.asarray(self.columns.labels[self.start:self.stop], np.float32)


def iter_batches(source: Any, batch_size: int) -> Iterable[dict[str, np.ndarray]]:
  """Sequential batches of ``source`` in index order (the last one may be short)."""
  for lo in range(0, len(source), batch_size):
    yield source.take(np.arange(lo, min(lo + batch_size, len(source))))
