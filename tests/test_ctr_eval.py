"""The CTR task's evaluation (dpmega/tasks/ctr.py): exact metrics with calibration, from the predictions."""

import jax
import ml_collections
import numpy as np
import pytest

from dpmega import metrics
from dpmega import tasks
from dpmega.models import ctr
from dpmega.tasks import ctr as ctr_task


def test_evaluate_reports_calibration_of_exactly_the_predictions(tmp_path):
  config = ml_collections.ConfigDict({"task": ctr_task.default_task_config("ctr_deepfm")})
  d = config.task.data
  d.synthetic_rows, d.synthetic_eval_rows, d.synthetic_vocab, d.synthetic_dir = 300, 300, 8, str(tmp_path)
  d.eval_batch_size = 128  # 300 = 2 full batches + a padded one
  config.task.model.buckets = 16
  task = tasks.build_task(config)
  params = task.init_params(jax.random.key(0))
  out = task.evaluate(params)
  model = ctr.make_model(ctr_task.model_config(config.task))
  labels, logits = ctr_task.make_predict(model, ctr_task.sources(config.task)[1], batch_size=128)(params)
  assert labels.shape == logits.shape == (300,)
  assert out == metrics.binary_metrics(labels, logits)
  assert out["ece"] == pytest.approx(metrics.expected_calibration_error(labels, logits))
  assert out["mean_predicted"] == pytest.approx(float(np.mean(1 / (1 + np.exp(-logits)))))
  table = metrics.calibration_table(labels, logits, binning="quantile")
  assert int(table.count.sum()) == 300
