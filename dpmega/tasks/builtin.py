"""A built-in task on generated data: ``synthetic_ctr``, a small CTR-style model.

The data is generated on the host from ``task.data_seed`` (no download): a few
hashed categorical features (Zipf-distributed ids, as in click logs) and dense
features, with clicks drawn from a fixed logistic "true" model that has
per-id effects, a dense linear part and a dense interaction, so that an
embeddings + MLP model can learn it and a linear-only model cannot fully.
The evaluation split is generated from the same distribution with another
stream and is disjoint from training.

The model is :class:`dpmega.models.ctr.CtrMlp`: one embedding table per
categorical feature, concatenated with the dense features, then an MLP to one
logit; the loss is the logistic (sigmoid cross-entropy) loss of ONE example, as
the trainer wants.

Config fields (``config.task``), with their defaults in :func:`default_task_config`:
``num_train``, ``num_eval``, ``num_categorical``, ``vocab_size``, ``num_dense``,
``embed_dim``, ``hidden`` (tuple of widths), ``data_seed``.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from dpmega import metrics as metrics_lib
from dpmega import validation
from dpmega.data.sources import ArraySource
from dpmega.models import ctr
from dpmega.tasks import Task

NAME = "synthetic_ctr"
_RAW_ID_SPACE = 1_000_003  # raw ids are hashed into vocab_size buckets


def default_task_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "name": NAME,
      "num_train": 100_000,
      "num_eval": 20_000,
      "num_categorical": 4,
      "vocab_size": 128,
      "num_dense": 8,
      "embed_dim": 8,
      "hidden": (32, 16),
      "data_seed": 1234,
  })


def _hash(raw: np.ndarray, vocab_size: int) -> np.ndarray:
  return ((raw.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(vocab_size)).astype(np.int32)


class _Truth:
  """The fixed logistic model that generates clicks."""

  def __init__(self, rng: np.random.Generator, num_categorical: int, vocab_size: int, num_dense: int):
    self.id_effects = rng.normal(0.0, 0.9, size=(num_categorical, vocab_size))
    self.dense_w = rng.normal(0.0, 0.5, size=(num_dense,))
    self.bias = -2.0

  def logits(self, cat: np.ndarray, dense: np.ndarray) -> np.ndarray:
    z = self.bias + dense @ self.dense_w
    z = z + self.id_effects[np.arange(cat.shape[1]), cat].sum(axis=1)
    if dense.shape[1] >= 2:
      z = z + 1.2 * np.tanh(dense[:, 0] * dense[:, 1])
    return z


def generate(cfg: Any, split: str) -> dict[str, np.ndarray]:
  """The ``"train"`` or ``"eval"`` split as arrays ``cat [n, F] int32``, ``dense [n, D]``, ``label [n]``."""
  validation.check_choice("split", split, ("train", "eval"))
  f = validation.check_int("task.num_categorical", cfg["num_categorical"], 1, 64)
  v = validation.check_int("task.vocab_size", cfg["vocab_size"], 2, 10_000_000)
  d = validation.check_int("task.num_dense", cfg["num_dense"], 0, 4096)
  rows = "num_train" if split == "train" else "num_eval"
  n = validation.check_int(f"task.{rows}", cfg[rows], 1, 10**9)
  seed = validation.check_int("task.data_seed", cfg["data_seed"], 0, 2**63 - 1)
  truth = _Truth(np.random.default_rng([seed, 0]), f, v, d)
  rng = np.random.default_rng([seed, 1 if split == "train" else 2])
  raw = np.minimum(rng.zipf(1.3, size=(n, f)), _RAW_ID_SPACE) + np.arange(f) * 7919
  cat = _hash(raw, v)
  dense = rng.normal(size=(n, d)).astype(np.float32)
  p = 1.0 / (1.0 + np.exp(-truth.logits(cat, dense)))
  label = (rng.random(n) < p).astype(np.float32)
  return {"cat": cat, "dense": dense, "label": label}


def build_task(config: Any) -> Task:
  """The ``synthetic_ctr`` task from ``config.task`` (see :func:`default_task_config`)."""
  cfg = config.task
  hidden = tuple(cfg.hidden)
  if not all(isinstance(h, int) and 1 <= h <= 65536 for h in hidden):
    raise ValueError(f"task.hidden must be a tuple of ints in [1, 65536], got {cfg.hidden!r}.")
  validation.check_int("task.embed_dim", cfg["embed_dim"], 1, 4096)
  train = generate(cfg, "train")
  evaluation = generate(cfg, "eval")
  model = ctr.CtrMlp(cfg.num_categorical, cfg.vocab_size, cfg.embed_dim, hidden)

  def init_params(key):
    return model.init(key, train["cat"][0], train["dense"][0])["params"]

  def loss_fn(params, example):
    logit = model.apply({"params": params}, example["cat"], example["dense"])
    return optax.sigmoid_binary_cross_entropy(logit, example["label"])

  predict = jax.jit(lambda params, cat, dense: model.apply({"params": params}, cat, dense))

  def evaluate(params, calibration: dict[str, float] | None = None) -> dict[str, float]:
    logits = np.concatenate([
        np.asarray(predict(params, evaluation["cat"][i:i + 8192], evaluation["dense"][i:i + 8192]))
        for i in range(0, len(evaluation["label"]), 8192)
    ]).astype(np.float64)
    labels = evaluation["label"]
    logits = metrics_lib.recalibrated_logits(logits, calibration)  # dpmega.train.recalibration's (a, b)
    out = {"accuracy": float(np.mean((logits > 0) == (labels > 0.5)))}
    out.update(metrics_lib.binary_metrics(labels, logits))
    return out

  def predict_logits(params, batch):
    return model.apply({"params": params}, batch["cat"], batch["dense"])

  return Task(NAME, init_params, loss_fn, ArraySource(train), evaluate, predict_logits=predict_logits)

