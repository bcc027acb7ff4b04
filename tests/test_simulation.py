"""The effective-noise simulation (dpmega.train.simulation): labelled, unaccounted, and the same sigma / B."""

import json
import os

import jax
import numpy as np
import pytest
from scipy import stats as sstats

from dpmega import accounting
from dpmega import train as train_lib
from dpmega.errors import UsageError
from dpmega.tasks import build_task
from dpmega.train import config as config_lib
from dpmega.train import simulation

from train_configs import linear_task_config


def _config(tmp_path, *overrides, name="sim"):
  return linear_task_config(tmp_path / name, "num_steps=3", "log_every=1", "tensorboard=False", *overrides)


def _run(config):
  lines = []
  result = train_lib.train(config, out=lines.append)
  return result, lines


@pytest.mark.parametrize("budget", ["target_epsilon=2.0", "clipped_count_noise=5.0"])
def test_simulation_refuses_a_privacy_budget_naming_the_fields(tmp_path, budget):
  config = _config(tmp_path, "simulate_k=4", budget, "metrics='private'")
  with pytest.raises(UsageError, match=r"simulate_k = 4 .*NOT private.*target_epsilon and clipped_count_noise"):
    config_lib.validate(config)
  assert not os.path.exists(config.workdir)  # refused before the workdir is touched
  with pytest.raises(UsageError, match="simulate_k"):
    train_lib.train(config, out=lambda s: None)
  assert not os.path.exists(config.workdir)


def test_simulation_needs_the_full_runs_noise_multiplier(tmp_path):
  with pytest.raises(UsageError, match="simulate_k = 2 needs noise_multiplier"):
    config_lib.validate(_config(tmp_path, "simulate_k=2", "noise_multiplier=None"))


def test_simulation_writes_no_ledger_and_labels_every_output(tmp_path):
  result, lines = _run(_config(tmp_path, "simulate_k=4", "batch_schedule='constant:64'"))
  workdir = str(tmp_path / "sim")
  assert lines and all(line.startswith(simulation.TAG) for line in lines), lines
  assert not any("epsilon " in line.lower().replace("no epsilon", "") for line in lines), lines
  names = set(os.listdir(workdir))
  assert not {"checkpoints", "spent.jsonl"} & names, names  # no journal of spent privacy, no checkpoint
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f if line.strip()]
  assert len(records) == 4 and all(r["simulation"] is True for r in records)
  assert not any("epsilon" in r for r in records)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["simulation"] is True and summary["private"] is False and summary["epsilon"] is None
  assert np.isnan(result.epsilon) and result.ledger.num_steps == 0 and result.spent.num_steps == 0


def test_the_run_privacy_of_a_simulation_refuses_to_record_or_account(tmp_path):
  config = _config(tmp_path, "simulate_k=2")
  trainer = train_lib.Trainer(config_lib.validate(config), build_task(config), out=lambda s: None)
  with pytest.raises(RuntimeError, match="NOT private"):
    trainer.privacy.record(accounting.Ledger(), 0, 1.0)
  with pytest.raises(RuntimeError, match="NOT private"):
    trainer.privacy.epsilon(accounting.Ledger())


def test_simulation_cannot_resume_or_write_beside_a_private_run(tmp_path):
  _run(linear_task_config(tmp_path / "sim", "num_steps=1", "tensorboard=False"))  # a private run's workdir
  with pytest.raises(UsageError, match="holds an earlier run"):
    _run(_config(tmp_path, "simulate_k=2"))
  assert os.path.exists(tmp_path / "sim" / "spent.jsonl")  # its journal is untouched
  with pytest.raises(UsageError, match="cannot be resumed"):
    train_lib.train(_config(tmp_path, "simulate_k=2", name="other"), resume=True, out=lambda s: None)


@pytest.mark.parametrize("k", [1, 4, 16])
def test_simulated_update_noise_matches_the_full_runs_sigma_over_b(tmp_path, k):
  # Every gradient is 0, so the one SGD step at learning rate 1 is minus the noise on the mean gradient:
  # its std must be sigma C / B of the run it predicts, whatever k (the batch is B / k, the noise sigma / k).
  d, sigma, big_b = 4096, 2.0, 256
  config = _config(tmp_path, f"simulate_k={k}", "task.kind='zero'", f"task.d={d}", f"noise_multiplier={sigma}",
                   f"batch_schedule='constant:{big_b}'", "num_steps=1", "optimizer.learning_rate=1.0",
                   "microbatch_size=16", "max_microbatches=16", name=f"k{k}")
  result, _ = _run(config)
  record = result.history[0]
  assert record["batch_size"] == big_b // k and record["full_batch_size"] == big_b
  assert record["sigma"] == pytest.approx(sigma / k) and record["sigma"] / record["batch_size"] == pytest.approx(
      sigma / big_b)
  delta = np.asarray(result.params["w"], np.float64)
  lo, hi = np.sqrt(sstats.chi2.ppf([1e-6, 1 - 1e-6], d) / d) * sigma / big_b
  assert lo <= np.sqrt(np.mean(delta ** 2)) <= hi


def test_simulated_sigmas_keep_sigma_over_b_when_k_does_not_divide_b():
  full = np.array([100, 1000, 3])
  sizes = simulation.simulated_batch_sizes(full, 16)
  np.testing.assert_allclose(simulation.simulated_sigmas(3.0, full, sizes) / sizes, 3.0 / full)


def test_sampling_excess_bound_matches_the_variance_the_smaller_poisson_batch_adds():
  # N clipped gradients of norm exactly C (the bound's worst case), Poisson-sampled at q = B / N (the real run)
  # and q / k (the simulation), each sum divided by its expected batch size. The simulation's extra variance of
  # the mean gradient, over the DP noise variance sigma^2 C^2 d / B^2 that both share, is the bound r.
  rng = np.random.default_rng(0)
  n, d, big_b, k, c, sigma, trials = 2000, 16, 200, 4, 3.0, 0.5, 4000
  g = rng.normal(size=(n, d))
  g *= c / np.linalg.norm(g, axis=1, keepdims=True)

  def variance(b):
    masks = rng.random((trials, n)) < b / n
    means = masks @ g / b
    return np.mean(np.sum((means - g.mean(axis=0)) ** 2, axis=1))

  excess = (variance(big_b // k) - variance(big_b)) / (sigma ** 2 * c ** 2 * d / big_b ** 2)
  r = simulation.sampling_excess_bound(sigma, np.array([big_b]), np.array([big_b // k]), d)
  assert r == pytest.approx((k - 1) * big_b / (sigma ** 2 * d))
  assert excess == pytest.approx(r, rel=0.1)  # Monte Carlo: 4,000 trials of each
  # The full batch adds nothing.
  assert simulation.sampling_excess_bound(sigma, np.array([big_b, 64]), np.array([big_b, 64]), d) == 0.0


@pytest.mark.parametrize("sigma, big_b, warned", [(2.0, 1024, False), (0.2, 1024, True), (2.0, 512, True)])
def test_a_simulation_states_its_fidelity_bound_and_warns_when_it_is_not_small(tmp_path, sigma, big_b, warned):
  # Warned when r is above FIDELITY_WARN (sigma 0.2), or when it samples fewer than FIDELITY_MIN_BATCH (512 / 4).
  d = 16384
  config = _config(tmp_path, "simulate_k=4", "task.kind='zero'", f"task.d={d}", "task.n=2048",
                   f"noise_multiplier={sigma}", f"batch_schedule='constant:{big_b}'", "num_steps=1",
                   "microbatch_size=64", "max_microbatches=8",
                   name=f"s{sigma}_{big_b}")
  result, lines = _run(config)
  num_params = sum(np.size(x) for x in jax.tree_util.tree_leaves(result.params))
  want = 3 * big_b / (sigma ** 2 * num_params)
  with open(os.path.join(config.workdir, "summary.json")) as f:
    assert json.load(f)["sampling_excess_bound"] == pytest.approx(want)
  assert any(f"r = {want:.3g}" in line and "fidelity" in line for line in lines), lines
  assert any("WARNING" in line and "smaller k" in line for line in lines) == warned
  assert (want > simulation.FIDELITY_WARN or big_b // 4 < simulation.FIDELITY_MIN_BATCH) == warned
