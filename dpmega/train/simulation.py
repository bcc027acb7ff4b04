"""Effective-noise simulation: a run at batch B/k and noise sigma/k that predicts the utility of B, sigma. NOT private.

At a fixed number of steps the utility of DP-SGD follows the noise on the averaged gradient, sigma C / B
(Sander, Stock, Sablayrolles, "TAN without a burn: scaling laws of DP-SGD", ICML 2023,
https://arxiv.org/abs/2210.03403). A run with ``simulate_k = k`` draws batches of B_t / k and adds noise
sigma_t = sigma * b_t / B_t (= sigma / k when k divides B_t), so that sigma_t / b_t = sigma / B_t at every step:
it predicts the accuracy of the run at batch B and noise sigma for 1/k of its compute. This is how a mega-batch
run is tuned without paying for the search.

How far to trust it: the simulation keeps the DP noise on the mean gradient, ``(sigma C / B)^2`` per
coordinate, but samples B / k examples, so its mean gradient carries more sampling noise. Under Poisson
sampling with the sum divided by the expected batch size, that noise has variance ``E||g||^2 (1 - q) / B``
(``g`` a clipped per-example gradient), so the simulation adds ``E||g||^2 (k - 1) / B`` to it, at most
``C^2 (k - 1) / B``. Against the DP noise's ``sigma^2 C^2 d / B^2`` over the run's ``d`` parameters:

    r = (k - 1) B / (sigma^2 d)    (:func:`sampling_excess_bound`, the largest over the steps)

bounds the simulation's extra variance as a fraction of the DP noise's. TAN's premise is ``r << 1``; as ``r``
grows the simulation turns pessimistic (it predicts a worse model than the real run gives). ``r`` is necessary,
not sufficient: it averages over all coordinates, while the sampling noise sits on the few with the largest
gradients, which an adaptive optimizer treats one by one. Measured on the tiny BERT (``bench/RESULTS.md``,
issue 20): at B = 16,384 (``b >= 1,024``) within 1.5% (k = 4) and 6% (k = 16) of the real accuracy, mean of 3
seeds, and within 7.5% at ``r`` up to 0.86; at ``b`` = 256-1,024 (B <= 4,096) 2-13% below it at
``r <= 0.6`` and 26-39% at ``r > 1``; at ``b = 64`` 35-48% below it even at ``r = 0.3``. The run prints ``r``
and warns above :data:`FIDELITY_WARN` or when it samples fewer than :data:`FIDELITY_MIN_BATCH` examples a step.

.. warning::
   A simulation is NOT a private release. Its sigma / k is far too little noise for the privacy of the batch
   B / k that it samples, so it keeps no ledger and no journal, writes no checkpoint, and never states an
   epsilon: every line it prints starts with :data:`TAG`, and ``metrics.jsonl`` and ``summary.json`` carry
   ``"simulation": true``. :func:`dpmega.train.config.validate` refuses it together with a privacy budget
   (``target_epsilon``, ``clipped_count_noise``), and :class:`dpmega.train.privacy.RunPrivacy` refuses to
   record or account its steps.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from dpmega import accounting
from dpmega.accounting import journal as journal_lib
from dpmega.errors import UsageError
from dpmega.train import report
from dpmega.train import workdir as workdir_lib
from dpmega.train.writer import MetricsWriter

TAG = "SIMULATION (not private):"
# Above this bound r (see the module docstring) a simulation warns that its prediction is pessimistic.
FIDELITY_WARN = 0.25
# Below this simulated batch size a simulation warns too (its measured error was 35-48% at b = 64 whatever r).
FIDELITY_MIN_BATCH = 256
REFUSAL = ("an effective-noise simulation (simulate_k > 0) is NOT private: it keeps no ledger and has no epsilon; "
           "run without simulate_k for a private run")


def simulated_batch_sizes(full_sizes: np.ndarray, k: int) -> np.ndarray:
  """The batch sizes the simulation samples: ``max(1, round(B_t / k))``.

  >>> simulated_batch_sizes(np.array([1024, 4096, 3]), 4).tolist()
  [256, 1024, 1]
  """
  return np.maximum(1, np.rint(np.asarray(full_sizes) / k)).astype(np.int64)


def simulated_sigmas(sigma: float, full_sizes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
  """sigma_t = sigma * b_t / B_t: the same noise on the mean gradient, sigma_t / b_t = sigma / B_t, every step.

  >>> simulated_sigmas(2.0, np.array([1024, 1000]), np.array([256, 250])).tolist()
  [0.5, 0.5]
  """
  return sigma * np.asarray(sizes, np.float64) / np.asarray(full_sizes, np.float64)


def sampling_excess_bound(sigma: float, full_sizes: np.ndarray, sizes: np.ndarray, num_params: int) -> float:
  """Upper bound ``r`` on the simulation's extra sampling variance over the DP noise's, the largest over steps.

  Per step, ``(B_t / b_t - 1) B_t / (sigma^2 d)``: the extra variance ``E||g||^2 (B_t / b_t - 1) / B_t`` of the
  mean gradient (``E||g||^2 <= C^2``: the gradients are clipped), over the DP noise's ``sigma^2 C^2 d / B_t^2``
  (module docstring). 0 when the simulation samples the full batch.

  >>> sampling_excess_bound(2.0, np.array([4096]), np.array([1024]), 10_000)
  0.3072
  """
  full = np.asarray(full_sizes, np.float64)
  k = full / np.asarray(sizes, np.float64)
  return float(np.max((k - 1.0) * full / (sigma ** 2 * num_params)))


def check_config(values: dict[str, Any]) -> None:
  """Refuses a simulation combined with a privacy budget; it needs the full run's ``noise_multiplier``.

  Raises:
    UsageError: naming the fields.
  """
  k = values["simulate_k"]
  if not k:
    return
  budget = {f: values[f] for f in ("target_epsilon", "clipped_count_noise") if values[f] is not None}
  if budget:
    raise UsageError(f"simulate_k = {k} (the effective-noise simulation, NOT private) cannot be combined with a "
                     f"privacy budget: target_epsilon and clipped_count_noise must be None, got {budget}. Set "
                     "noise_multiplier to the sigma of the run it predicts (dpmega calibrate gives it).")
  if values["noise_multiplier"] is None:
    raise UsageError(f"simulate_k = {k} needs noise_multiplier: the sigma of the run at the full batch schedule "
                     "that it predicts (dpmega calibrate gives it), got None.")


def run(trainer: Any, *, resume: bool, overwrite: bool, stop: Any) -> report.TrainResult:
  """Runs ``trainer`` (a :class:`dpmega.train.loop.Trainer` with ``cfg.simulate_k > 0``) as a simulation.

  Writes ``metrics.jsonl`` and ``summary.json`` (labelled ``"simulation": true``, no epsilon), no checkpoint,
  no journal. The returned result's ``epsilon`` is NaN and its ledgers are empty.
  """
  cfg, out = trainer.cfg, trainer.out
  k, sigma = cfg.simulate_k, cfg.noise_multiplier
  if resume:
    raise UsageError(f"simulate_k = {k}: a simulation writes no checkpoint, so it cannot be resumed; run it again.")
  # A workdir of a private run keeps its journal and checkpoints: a simulation never writes beside them.
  if overwrite:
    workdir_lib.discard_run(cfg.workdir, journal_name=journal_lib.FILENAME)
  if os.path.isdir(cfg.workdir) and {"checkpoints", journal_lib.FILENAME} & set(os.listdir(cfg.workdir)):
    raise UsageError(f"simulate_k = {k}: workdir {cfg.workdir!r} holds an earlier run; a simulation starts in a "
                     "fresh workdir (or pass --overwrite).")
  os.makedirs(cfg.workdir, exist_ok=True)
  full, sizes = trainer.full_batch_sizes, trainer.batch_sizes
  sigmas = simulated_sigmas(sigma, full, sizes)
  out(f"{TAG} effective-noise simulation with k = {k}: {cfg.num_steps} steps at batch B_t / k (from "
      f"{int(sizes.min()):,} to {int(sizes.max()):,}) with noise sigma_t = sigma * b_t / B_t (from {sigmas.min():.4g} "
      f"to {sigmas.max():.4g}), predicting the utility of the run at batch schedule {cfg.batch_schedule.to_spec()} "
      f"with sigma = {sigma:.6g} over N = {trainer.dataset_size:,} examples")
  out(f"{TAG} no ledger, no journal, no checkpoint, no epsilon: this run protects nothing")
  state = trainer.initial_state()
  num_params = trainer.num_params
  excess = sampling_excess_bound(sigma, full, sizes, num_params)
  out(f"{TAG} fidelity: its extra sampling variance is at most r = {excess:.3g} of the DP noise's "
      f"((k - 1) B / (sigma^2 d), d = {num_params:,} parameters; TAN's premise is r << 1)")
  if excess > FIDELITY_WARN or sizes.min() < FIDELITY_MIN_BATCH:
    out(f"{TAG} WARNING: r = {excess:.3g}, smallest batch {int(sizes.min()):,} (want r <= {FIDELITY_WARN:g} and "
        f"a batch >= {FIDELITY_MIN_BATCH}): the sampling noise of batch B / k is not small against the DP noise, so "
        "this simulation is pessimistic, it predicts a worse model than the real run would give (tiny BERT: up "
        "to 13% below at r <= 0.6, 26-39% at r > 1, 35-48% at batch 64); use a smaller k")
  writer = MetricsWriter(cfg.workdir, resume_step=None, tensorboard=cfg.tensorboard)
  history: list[dict[str, Any]] = []
  stop_reason = None
  try:
    while int(state.step) < cfg.num_steps:
      t = int(state.step)
      if stop is not None and stop.is_set():
        stop_reason = f"stopped by SIGTERM after step {t}"
        out(f"{TAG} {stop_reason}")
        break
      state, metrics = trainer.train_step(state, float(sigmas[t]))
      step = t + 1
      record = {"simulation": True, "simulate_k": k, "step": step, **metrics, "sigma": float(sigmas[t]),
                "full_batch_size": int(full[t]), "full_sigma": sigma, "effective_noise": sigma / float(full[t])}
      if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
        record.update({f"eval_{n}": v for n, v in trainer._evaluate(trainer.model_params(state)).items()})  # noqa: SLF001
      history.append(record)
      report.check_finite(metrics, step, None)
      writer.write(record)
      if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.num_steps):
        out(progress_line(cfg, record))
    eval_metrics = trainer._evaluate(trainer.model_params(state))  # noqa: SLF001
    writer.write({"simulation": True, "simulate_k": k, "step": int(state.step), "final": True,
                  **{f"eval_{n}": v for n, v in eval_metrics.items()}})
  finally:
    writer.close()
  with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
    json.dump({"simulation": True, "private": False, "epsilon": None, "simulate_k": k, "steps": int(state.step),
               "num_steps": cfg.num_steps, "batch_schedule": cfg.batch_schedule.to_spec(),
               "noise_multiplier": sigma, "clip_norm": cfg.clip_norm, "sampling_excess_bound": excess,
               "stop_reason": stop_reason,
               "eval": eval_metrics, "note": REFUSAL}, f, indent=2)
  out(f"{TAG} done: {int(state.step)} steps; predicts the run at batch schedule {cfg.batch_schedule.to_spec()} "
      f"with sigma = {sigma:.6g}; no privacy guarantee, no epsilon")
  out(f"{TAG} eval: " + ", ".join(f"{n} {v:.4f}" for n, v in eval_metrics.items()))
  return report.TrainResult(int(state.step), math.nan, cfg.delta, sigma, stop_reason, eval_metrics,
                            trainer.model_params(state), accounting.Ledger(), history, math.nan, accounting.Ledger())


def progress_line(cfg: Any, r: dict[str, Any]) -> str:
  """The line a logged simulation step prints: always :data:`TAG` first, never an epsilon."""
  line = (f"{TAG} step {r['step']}/{cfg.num_steps}  batch {r['batch_size']:,} (stands for {r['full_batch_size']:,})"
          f"  sigma {r['sigma']:.4g} (stands for {r['full_sigma']:.4g})")
  if "loss" in r:
    line += f"  loss {r['loss']:.4f}"
  evals = {n[5:]: v for n, v in r.items() if n.startswith("eval_")}
  if evals:
    line += "  eval " + " ".join(f"{n} {v:.4f}" for n, v in evals.items())
  return line
