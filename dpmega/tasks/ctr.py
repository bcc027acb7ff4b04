"""The CTR tasks ``ctr_wide_deep``, ``ctr_deepfm``, ``ctr_dlrm``: model + Criteo data + exact metrics.

``config.task`` fields (defaults in :func:`default_task_config`):

``name``
  ``ctr_wide_deep`` | ``ctr_deepfm`` | ``ctr_dlrm`` (chooses the model).
``model``
  ``buckets`` (int or 26 ints: hash buckets per categorical feature),
  ``embed_dim`` (int or 26 ints), ``mlp_dims``, ``bottom_mlp_dims`` (DLRM),
  ``num_crosses`` and ``cross_buckets`` (Wide & Deep), ``embed_init_std``,
  ``project_to`` (mixed-dimension embeddings) and ``mlet_inner`` (MLET): 0 is off
  (:class:`dpmega.models.ctr.CtrModelConfig`).
``data``
  ``train_dir``: a directory written by :func:`dpmega.data.criteo.convert`;
  empty: generate learnable data (:mod:`dpmega.data.criteo_synthetic`) of
  ``synthetic_rows`` train and ``synthetic_eval_rows`` evaluation rows with
  ``synthetic_vocab`` values per feature (0: the default, skewed vocabularies)
  and ``synthetic_seed``, into ``synthetic_dir`` (empty: a temporary directory),
  reusing it when it was already generated with the same settings.
  ``eval_dir``: evaluation directory; empty: the last ``eval_fraction`` of
  ``train_dir`` (the Criteo files are in time order, so this is the usual
  "last day" split). ``eval_max_rows``: evaluate on at most this many rows
  (0: all), ``eval_batch_size``.

The evaluation split is never part of ``train_source``; its metrics are exact
(:mod:`dpmega.metrics`) and not private with respect to the evaluation rows.

The models are :mod:`dpmega.models.ctr`; the runs (trainer settings, table
sizes, the Criteo Kaggle variant) are ``configs/ctr_*.py``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpmega import metrics as metrics_lib
from dpmega import validation
from dpmega.data import criteo
from dpmega.data import criteo_synthetic
from dpmega.models import ctr
from dpmega.tasks import Task

# task name -> the architecture it trains.
TASK_NAMES = {"ctr_wide_deep": ctr.ModelKind.WIDE_DEEP, "ctr_deepfm": ctr.ModelKind.DEEPFM,
              "ctr_dlrm": ctr.ModelKind.DLRM}


def default_task_config(name: str = "ctr_dlrm") -> ml_collections.ConfigDict:
  """``config.task`` of the CTR task ``name``, every field with its default (small: a minute on a laptop CPU)."""
  return ml_collections.ConfigDict({
      "name": name,
      "model": {
          "buckets": 1000,
          "embed_dim": 8,
          "mlp_dims": (64, 32),
          "bottom_mlp_dims": (32,),
          "num_crosses": 8,
          "cross_buckets": 10_000,
          "embed_init_std": 0.05,
          "project_to": 0,
          "mlet_inner": 0,
      },
      "data": {
          "train_dir": "",
          "eval_dir": "",
          "eval_fraction": 0.1,
          "eval_max_rows": 0,
          "eval_batch_size": 4096,
          "synthetic_rows": 50_000,
          "synthetic_eval_rows": 10_000,
          "synthetic_vocab": 0,
          "synthetic_seed": 0,
          "synthetic_dir": "",
      },
  })


def model_config(cfg: Any) -> ctr.CtrModelConfig:
  """The :class:`dpmega.models.ctr.CtrModelConfig` of ``config.task``."""
  kind = TASK_NAMES[validation.check_choice("task.name", cfg.name, sorted(TASK_NAMES))]
  m = cfg.model
  buckets = criteo.validate_buckets(m.buckets, criteo.NUM_CAT, "task.model.buckets")
  num_crosses = validation.check_int("task.model.num_crosses", m.get("num_crosses", 0), 0, criteo.NUM_CAT // 2)
  try:
    return ctr.CtrModelConfig(
        kind=kind,
        buckets=buckets,
        embed_dims=m.embed_dim if isinstance(m.embed_dim, int) else tuple(m.embed_dim),
        num_dense=criteo.NUM_INT,
        mlp_dims=tuple(m.mlp_dims),
        bottom_mlp_dims=tuple(m.get("bottom_mlp_dims", (32,))),
        crosses=ctr.default_crosses(criteo.NUM_CAT, num_crosses),
        cross_buckets=int(m.get("cross_buckets", 10_000)),
        embed_init_std=float(m.get("embed_init_std", 0.05)),
        project_to=m.get("project_to", 0),
        mlet_inner=m.get("mlet_inner", 0),
    )
  except ValueError as e:
    raise ValueError(f"task.model: {e}") from None


def _synthetic_dirs(d: Any) -> tuple[Path, Path]:
  """Generates (or reuses) the synthetic train and evaluation directories."""
  rows = validation.check_int("task.data.synthetic_rows", d.synthetic_rows, 1)
  eval_rows = validation.check_int("task.data.synthetic_eval_rows", d.synthetic_eval_rows, 1)
  vocab = validation.check_int("task.data.synthetic_vocab", d.synthetic_vocab, 0)  # 0: the default vocabularies
  seed = validation.check_int("task.data.synthetic_seed", d.synthetic_seed, 0)
  spec = criteo_synthetic.small_spec(vocab) if vocab else criteo_synthetic.SyntheticSpec()
  key = json.dumps({"rows": rows, "eval_rows": eval_rows, "spec": repr(spec), "seed": seed}, sort_keys=True)
  tag = hashlib.sha256(key.encode()).hexdigest()[:12]
  root = Path(d.synthetic_dir) if d.synthetic_dir else Path(tempfile.gettempdir()) / "dpmega-ctr-synthetic"
  base = root / f"criteo-synthetic-{tag}"
  train, evaluation = base / "train", base / "eval"
  if not (train / "meta.json").exists() or not (evaluation / "meta.json").exists():
    base.mkdir(parents=True, exist_ok=True)
    criteo_synthetic.generate_dataset(train, rows, spec=spec, seed=seed, row_seed=2 * seed)
    criteo_synthetic.generate_dataset(evaluation, eval_rows, spec=spec, seed=seed, row_seed=2 * seed + 1)
  return train, evaluation


def sources(cfg: Any) -> tuple[criteo.CriteoSource, criteo.CriteoSource]:
  """(train, evaluation) sources of ``config.task`` (disjoint rows)."""
  d = cfg.data
  buckets = criteo.validate_buckets(cfg.model.buckets, criteo.NUM_CAT, "task.model.buckets")
  if not d.train_dir:
    train_dir, eval_dir = _synthetic_dirs(d)
    return criteo.CriteoSource(train_dir, buckets), criteo.CriteoSource(eval_dir, buckets)
  columns = criteo.open_columns(d.train_dir)
  if d.eval_dir:
    return criteo.CriteoSource(columns, buckets), criteo.CriteoSource(d.eval_dir, buckets)
  frac = validation.check_real("task.data.eval_fraction", d.eval_fraction, 0, 1, lo_open=True, hi_open=True)
  n = len(columns)
  cut = n - max(1, int(round(frac * n)))
  if cut < 1:
    raise ValueError(f"task.data.train_dir has {n} rows: too few to split off an evaluation fraction of {frac}.")
  return criteo.CriteoSource(columns, buckets, stop=cut), criteo.CriteoSource(columns, buckets, start=cut)


def make_predict(model, source: criteo.CriteoSource, *, batch_size: int = 4096, max_rows: int = 0):
  """``params -> (labels, logits)`` (float64 NumPy) on the first ``max_rows`` (0: all) rows of ``source``.

  Batches are padded to ``batch_size`` so the prediction compiles once. For
  the calibration table of a model: ``metrics.calibration_table(*predict(params))``.
  """
  batch_size = validation.check_int("task.data.eval_batch_size", batch_size, 1)
  max_rows = validation.check_int("task.data.eval_max_rows", max_rows, 0)
  n = len(source) if not max_rows else min(max_rows, len(source))
  apply = jax.jit(lambda params, dense, sparse: model.apply({"params": params}, dense, sparse))

  def predict(params) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = [], []
    for lo in range(0, n, batch_size):
      idx = np.arange(lo, min(lo + batch_size, n))
      batch = source.take(np.pad(idx, (0, batch_size - idx.size), mode="edge"))
      logits.append(np.asarray(apply(params, batch["dense"], batch["sparse"]))[:idx.size])
      labels.append(batch["label"][:idx.size])
    return np.concatenate(labels).astype(np.float64), np.concatenate(logits).astype(np.float64)

  return predict


def make_evaluate(model, source: criteo.CriteoSource, *, batch_size: int = 4096, max_rows: int = 0):
  """``params -> metrics`` on the first ``max_rows`` (0: all) rows of ``source``, exactly.

  The metrics are :func:`dpmega.metrics.binary_metrics`: AUC, log loss,
  normalized entropy, ECE, mean prediction and positive rate (the trainer's
  eval line shows them all). With ``calibration`` (``{"temperature": a, "bias": b}``,
  :mod:`dpmega.train.recalibration`), of the predictions ``sigmoid(a z + b)``.
  """
  predict = make_predict(model, source, batch_size=batch_size, max_rows=max_rows)

  def evaluate(params, calibration: dict[str, float] | None = None) -> dict[str, float]:
    labels, logits = predict(params)
    return metrics_lib.binary_metrics(labels, metrics_lib.recalibrated_logits(logits, calibration))

  return evaluate


def per_example_loss(model):
  """``(params, example) -> scalar`` logistic loss of ONE example (no batch axis)."""

  def loss_fn(params, example):
    logit = model.apply({"params": params}, example["dense"], example["sparse"])
    return optax.sigmoid_binary_cross_entropy(logit, example["label"])

  return loss_fn


def make_init_params(model) -> Any:
  """``init_params(key)``: the parameters of ``model`` (a CTR model), initialised on one all-zero example."""

  def init_params(key):
    dense = jnp.zeros((criteo.NUM_INT,), jnp.float32)
    sparse = jnp.zeros((criteo.NUM_CAT,), jnp.int32)
    return model.init(key, dense, sparse)["params"]

  return init_params


def build_task(config: Any) -> Task:
  """The CTR task of ``config.task`` (see the module docstring)."""
  cfg = config.task
  mcfg = model_config(cfg)
  model = ctr.make_model(mcfg)
  train, evaluation = sources(cfg)
  d = cfg.data

  init_params = jax.jit(make_init_params(model))
  evaluate = make_evaluate(model, evaluation, batch_size=d.get("eval_batch_size", 4096),
                           max_rows=d.get("eval_max_rows", 0))
  def predict_logits(params, batch):
    return model.apply({"params": params}, batch["dense"], batch["sparse"])

  return Task(cfg.name, init_params, per_example_loss(model), train, evaluate, predict_logits=predict_logits)
