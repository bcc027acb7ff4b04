"""Learnable Criteo-format data: labels drawn from a hidden model with interactions.

Tests, the demo and the utility benchmark write these files and then read them
with exactly the reader used for the real release (:mod:`dpmega.data.criteo_tsv`),
so the whole path -- text, conversion, hashing, random access -- is exercised.

The hidden model (fixed by ``seed``), for one row with categorical values
``c_f`` (Zipf-distributed over a per-feature vocabulary, sometimes missing) and
integer counts ``x_j`` (log-normal, sometimes missing)::

    logit = b + sum_f w_f[c_f]                        first order, every feature
              + sum_{f<g<K} <u_f[c_f], u_g[c_g]>      pairwise (FM) interactions
              + sum_j a_j * t(x_j)                    dense, t = standardized log1p
              + t(x_0) * v[c_1]                       dense x categorical

scaled so that the non-bias part has standard deviation ``signal``, with ``b``
set so that the positive rate is ``positive_rate``. ``label ~ Bernoulli(sigmoid(logit))``.
The AUC of the true probabilities (``SyntheticInfo.oracle_auc``) is the
ceiling any model can reach on the file.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from dpmega import metrics
from dpmega.data.criteo import NUM_CAT
from dpmega.data.criteo import NUM_INT


_BLOCK_ROWS = 8192


def _default_vocab() -> tuple[int, ...]:
  return tuple(int(v) for v in np.geomspace(3, 2000, NUM_CAT).round())


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """The distribution of the generated rows.

  Attributes:
    vocab_sizes: distinct values per categorical feature (26 ints >= 1).
    zipf: popularity exponent of categorical values (> 0; larger = more skewed).
    missing_rate: largest per-feature probability of an empty field, in [0, 1).
    num_interacting: features ``0..K-1`` with pairwise interactions (<= 26).
    latent_dim: dimension of the hidden interaction vectors (>= 1).
    signal: standard deviation of the logit around its bias (>= 0).
    positive_rate: target fraction of label 1, in (0, 1).
  """

  vocab_sizes: tuple[int, ...] = dataclasses.field(default_factory=_default_vocab)
  zipf: float = 1.1
  missing_rate: float = 0.3
  num_interacting: int = 8
  latent_dim: int = 4
  signal: float = 2.0
  positive_rate: float = 0.25

  def __post_init__(self):
    if len(self.vocab_sizes) != NUM_CAT or any(int(v) < 1 for v in self.vocab_sizes):
      raise ValueError(f"vocab_sizes must be {NUM_CAT} ints >= 1, got {self.vocab_sizes!r}.")
    if not self.zipf > 0:
      raise ValueError(f"zipf must be > 0, got {self.zipf=}.")
    if not 0 <= self.missing_rate < 1:
      raise ValueError(f"missing_rate must be in [0, 1), got {self.missing_rate=}.")
    if not 0 <= self.num_interacting <= NUM_CAT:
      raise ValueError(f"num_interacting must be in [0, {NUM_CAT}], got {self.num_interacting=}.")
    if self.latent_dim < 1:
      raise ValueError(f"latent_dim must be >= 1, got {self.latent_dim=}.")
    if not self.signal >= 0:
      raise ValueError(f"signal must be >= 0, got {self.signal=}.")
    if not 0 < self.positive_rate < 1:
      raise ValueError(f"positive_rate must be in (0, 1), got {self.positive_rate=}.")


@dataclasses.dataclass(frozen=True)
class SyntheticInfo:
  """What was written: row count, realized positive rate, and the oracle's AUC."""

  path: str
  rows: int
  positive_rate: float
  oracle_auc: float


def _zipf_cdf(v: int, exponent: float) -> np.ndarray:
  p = np.arange(1, v + 1, dtype=np.float64) ** -exponent
  return np.cumsum(p) / p.sum()


class _HiddenModel:
  """Draws rows and their true click probabilities; fixed by the seed."""

  def __init__(self, spec: SyntheticSpec, seed: int):
    self.spec = spec
    rng = np.random.default_rng([seed, 0])
    self.vocab = [int(v) for v in spec.vocab_sizes]
    # Index v in [0, V) is a value, index V means "missing".
    self.tokens = [np.array([f"{t:08x}" for t in rng.integers(0, 2**32, v)]) for v in self.vocab]
    self.popularity = [_zipf_cdf(v, spec.zipf) for v in self.vocab]
    self.cat_missing = rng.uniform(0, spec.missing_rate, NUM_CAT) * (rng.random(NUM_CAT) < 0.5)
    self.int_missing = rng.uniform(0, spec.missing_rate, NUM_INT) * (rng.random(NUM_INT) < 0.5)
    self.int_mu = rng.uniform(0.0, 4.0, NUM_INT)
    self.int_sigma = rng.uniform(0.5, 1.5, NUM_INT)
    self.w1 = [rng.normal(0, 1, v + 1) for v in self.vocab]
    k = spec.latent_dim
    self.u = [rng.normal(0, 1 / np.sqrt(k), (v + 1, k)) for v in self.vocab[:spec.num_interacting]]
    self.a = rng.normal(0, 1, NUM_INT)
    self.v = rng.normal(0, 1, self.vocab[1] + 1)
    # Calibrate scale and bias once, on a sample from the same distribution.
    cal_cats, cal_ints = self._draw(np.random.default_rng([seed, 1]), 20_000)
    raw = self._raw_logit(cal_cats, cal_ints)
    self.scale = spec.signal / max(float(np.std(raw)), 1e-12)
    self.bias = self._solve_bias(self.scale * (raw - raw.mean())) - self.scale * raw.mean()

  def _draw(self, rng, n):
    cats = np.empty((n, NUM_CAT), np.int64)
    for f, v in enumerate(self.vocab):
      cats[:, f] = np.searchsorted(self.popularity[f], rng.random(n))
      cats[rng.random(n) < self.cat_missing[f], f] = v
    ints = np.floor(np.exp(rng.normal(self.int_mu, self.int_sigma, (n, NUM_INT)))).astype(np.int64) - 1
    ints[:, 1] -= rng.random(n) < 0.05  # Kaggle's I2 has small negative values.
    ints[rng.random((n, NUM_INT)) < self.int_missing] = np.iinfo(np.int64).min
    return cats, ints

  def _raw_logit(self, cats, ints):
    missing = ints == np.iinfo(np.int64).min
    t = np.where(missing, 0.0, np.log1p(np.maximum(ints, 0)))
    t = (t - self.int_mu) / self.int_sigma
    z = sum(self.w1[f][cats[:, f]] for f in range(NUM_CAT))
    lat = [self.u[f][cats[:, f]] for f in range(len(self.u))]
    total = sum(lat) if lat else 0
    if lat:
      z = z + 0.5 * (np.sum(total * total, axis=1) - sum(np.sum(e * e, axis=1) for e in lat))
    z = z + t @ self.a + t[:, 0] * self.v[cats[:, 1]]
    return z

  def _solve_bias(self, centered):
    lo, hi = -30.0, 30.0
    for _ in range(60):
      mid = (lo + hi) / 2
      if np.mean(1 / (1 + np.exp(-(centered + mid)))) < self.spec.positive_rate:
        lo = mid
      else:
        hi = mid
    return (lo + hi) / 2

  def sample(self, rng, n):
    """(text lines, labels, probabilities) of ``n`` fresh rows."""
    cats, ints = self._draw(rng, n)
    logit = self.bias + self.scale * self._raw_logit(cats, ints)
    prob = 1 / (1 + np.exp(-logit))
    labels = (rng.random(n) < prob).astype(np.int64)
    cols = [labels.astype(str)]
    for j in range(NUM_INT):
      s = ints[:, j].astype(str)
      cols.append(np.where(ints[:, j] == np.iinfo(np.int64).min, "", s))
    for f, v in enumerate(self.vocab):
      tok = np.append(self.tokens[f], "")  # index V = missing
      cols.append(tok[cats[:, f]])
    lines = ["\t".join(r) for r in zip(*(c.tolist() for c in cols))]
    return lines, labels, prob


def write_synthetic_criteo(
    path: str | os.PathLike,
    num_rows: int,
    *,
    spec: SyntheticSpec | None = None,
    seed: int = 0,
    row_seed: int | None = None,
) -> SyntheticInfo:
  """Writes ``num_rows`` learnable Criteo-format lines to ``path`` (``.gz``: gzipped).

  Args:
    path: output file; its parent directory must exist.
    num_rows: lines to write, >= 1.
    spec: the data distribution (default :class:`SyntheticSpec`).
    seed: fixes the hidden model (vocabularies, weights).
    row_seed: seeds the rows (default: ``seed``); two files with the same
      ``seed`` and different ``row_seed`` are independent samples of the same
      distribution (e.g. a train file and an evaluation file).

  Returns:
    :class:`SyntheticInfo` with the oracle AUC of the written rows.
  """
  if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 1:
    raise ValueError(f"num_rows must be an int >= 1, got {num_rows=!r}.")
  spec = SyntheticSpec() if spec is None else spec
  model = _HiddenModel(spec, seed)
  row_seed = seed if row_seed is None else row_seed
  path = Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  all_labels, all_probs = [], []
  with opener(path, "wt", encoding="ascii", newline="\n") as f:
    # Fixed-size blocks, each with its own stream: the first k rows of a file
    # do not depend on how many rows follow them, and memory stays bounded.
    for block, lo in enumerate(range(0, num_rows, _BLOCK_ROWS)):
      rng = np.random.default_rng([row_seed, 2, block])
      lines, labels, probs = model.sample(rng, min(_BLOCK_ROWS, num_rows - lo))
      f.write("\n".join(lines) + "\n")
      all_labels.append(labels.astype(np.uint8))
      all_probs.append(probs.astype(np.float32))
  labels = np.concatenate(all_labels)
  probs = np.concatenate(all_probs)
  both = 0 < labels.sum() < labels.size
  return SyntheticInfo(
      path=str(path), rows=num_rows, positive_rate=float(labels.mean()),
      oracle_auc=metrics.auc(labels, probs) if both else float("nan"))


def generate_dataset(out_dir: str | os.PathLike, num_rows: int, *, spec: SyntheticSpec | None = None,
                     seed: int = 0, row_seed: int | None = None, progress: bool = False) -> SyntheticInfo:
  """Writes a TSV to ``out_dir.tsv`` and converts it to ``out_dir`` (for tests and demos).

  Returns the :class:`SyntheticInfo` of the TSV; the columns are at ``out_dir``.
  """
  from dpmega.data import criteo_tsv  # pylint: disable=g-import-not-at-top

  out_dir = Path(out_dir)
  tsv = out_dir.with_name(out_dir.name + ".tsv")
  info = write_synthetic_criteo(tsv, num_rows, spec=spec, seed=seed, row_seed=row_seed)
  criteo_tsv.convert(tsv, out_dir, progress=progress, overwrite=True)
  return info


def small_spec(vocab: int = 16, **kwargs) -> SyntheticSpec:
  """A spec with ``vocab`` values per feature: learnable from a few thousand rows."""
  return SyntheticSpec(vocab_sizes=(vocab,) * NUM_CAT, **kwargs)


__all__: Sequence[str] = ("SyntheticSpec", "SyntheticInfo", "write_synthetic_criteo", "generate_dataset",
                          "small_spec")
