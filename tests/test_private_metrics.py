"""metrics='private': only privatized quantities leave the trainer; the noisy clipped count is accounted."""

import glob
import json
import os

import pytest

from dpmega import accounting
from dpmega.train import config as config_lib
from dpmega import train as train_lib
from dpmega.errors import UsageError

from tests import train_configs

RAW_KEYS = {"loss", "sampled", "clipped_fraction", "mean_grad_norm", "nonfinite", "seconds", "examples_per_s"}


_RUN = ("num_steps=3", "clip_norm=0.5", "insecure_reproducible_seed=3", "optimizer.learning_rate=0.1",
        "log_every=1", "tensorboard=True")


def _config(tmp_path, *overrides, name="run"):
  return train_configs.linear_task_config(tmp_path / name, *_RUN, *overrides)


def _everything_written(workdir, lines):
  texts = list(lines)
  for path in glob.glob(os.path.join(workdir, "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        texts.append(f.read().decode("latin-1"))
  return texts


def test_private_mode_writes_and_prints_no_raw_statistic(tmp_path):
  raw_lines = []
  raw = train_lib.train(_config(tmp_path, name="raw"), out=raw_lines.append)
  first = raw.history[0]
  assert RAW_KEYS <= set(first)  # raw mode (the default) has them: the check below is not vacuous
  lines = []
  private = train_lib.train(_config(tmp_path, "metrics='private'", "clipped_count_noise=4.0", name="private"),
                            out=lines.append)
  for r in private.history:
    assert not RAW_KEYS & set(r), r
    assert {"noisy_grad_norm", "update_norm", "private_clipped_fraction", "epsilon"} <= set(r)
  # The raw values of step 1 (computed from the initial parameters: the same in both runs) appear nowhere:
  # not in metrics.jsonl, summary.json, config.json, TensorBoard events or the printed lines.
  texts = _everything_written(str(tmp_path / "private"), lines)
  for key in ("loss", "mean_grad_norm"):
    for text in texts:
      assert repr(first[key]) not in text and f"{first[key]:.4f}" not in text, (key, first[key])
  assert not any("ex/s" in line or "loss" in line for line in lines)
  assert any("noisy grad norm" in line for line in lines)


def test_noisy_clipped_count_is_accounted_at_the_effective_noise_multiplier(tmp_path):
  lines = []
  result = train_lib.train(_config(tmp_path, "metrics='private'", "clipped_count_noise=2.0"), out=lines.append)
  sigma_eff = train_lib.effective_noise_multiplier(1.0, 2.0)
  assert sigma_eff == pytest.approx(1 / (1 + 1 / 4) ** 0.5)
  assert {r.noise_multiplier for r in result.ledger.runs} == {sigma_eff}
  want = accounting.Ledger()
  want.record(batch_size=32, dataset_size=256, noise_multiplier=sigma_eff, scheme="poisson", steps=3)
  assert result.epsilon == pytest.approx(accounting.compute_epsilon(want, 1e-6, "rdp"), rel=1e-6)
  assert any("sigma_b = 2" in line and "sigma_eff" in line for line in lines)
  summary = json.load(open(os.path.join(str(tmp_path / "run"), "summary.json")))
  assert summary["accounted_noise_multiplier"] == sigma_eff and summary["metrics"] == "private"


def test_clipped_count_noise_needs_private_mode(tmp_path):
  with pytest.raises(UsageError, match="clipped_count_noise must be None unless metrics='private'"):
    config_lib.validate(_config(tmp_path, "clipped_count_noise=2.0"))


def test_calibration_accounts_for_the_count_noise(tmp_path):
  config = _config(tmp_path, "metrics='private'", "clipped_count_noise=20.0", "noise_multiplier=None",
                   "target_epsilon=3.0", "tensorboard=False", "log_every=0")
  result = train_lib.train(config, out=lambda s: None)
  assert result.epsilon <= 3.0
  assert train_lib.effective_noise_multiplier(result.noise_multiplier, 20.0) == pytest.approx(
      result.ledger.runs[0].noise_multiplier)


def test_noise_sampler_reaches_the_noise_and_its_delta_tail_is_reported(tmp_path):
  lines = []
  bounded = train_lib.train(_config(tmp_path, "noise_sampler='jax_bounded'", "tensorboard=False", name="bounded"),
                            out=lines.append)
  wide = train_lib.train(_config(tmp_path, "tensorboard=False", name="wide"), out=lambda s: None)
  assert any("jax_bounded noise sampler's bounded support costs delta_tail" in line for line in lines)
  assert bounded.delta_tail > 1e-6 > wide.delta_tail  # the floor of jax.random.normal, the default's is tiny
  summary = json.load(open(os.path.join(str(tmp_path / "bounded"), "summary.json")))
  assert summary["noise_sampler"] == "jax_bounded" and summary["delta_tail"] == bounded.delta_tail
  # Same secret, same data: only the sampler differs, and so does the first update.
  assert bounded.history[0]["noisy_grad_norm"] != wide.history[0]["noisy_grad_norm"]
