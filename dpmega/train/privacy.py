"""The run's privacy: the plan it prints, ε of what it spent, and the budget stop before a step.

:class:`RunPrivacy` is the trainer's view of :class:`dpmega.accounting.Plan` (what will run, accounted as
``dpmega epsilon`` / ``dpmega calibrate`` account it) and of :mod:`dpmega.accounting` (ε of a ledger of what
ran), for one validated config on one dataset: it chooses σ (fixed, or calibrated for the whole schedule),
prints the plan, and decides before each step whether the workdir's budget allows it. Every ε is at the
config's δ, which covers the noise sampler's bounded support (``δ_tail``, invariant 8).

With a clipped-count noise σ_b (``metrics="private"``) every step is accounted at
:func:`dpmega.train.step.effective_noise_multiplier` of the gradient's σ and σ_b: :meth:`RunPrivacy.accounted`
is the one place that conversion happens.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from dpmega import accounting
from dpmega import truncation
from dpmega.errors import UsageError
from dpmega.train import config as config_lib
from dpmega.train.step import effective_noise_multiplier


def fmt_int(n: int) -> str:
  """``n`` with thousands separators (``16,384``)."""
  return f"{int(n):,}"


class RunPrivacy:
  """The privacy plan and the ε bookkeeping of one run.

  Args:
    cfg: the validated trainer config.
    dataset_size: N, the number of training examples.
    batch_sizes: the schedule's expected batch size of every step.
    tail: the noise sampler's bounded support and the number of noised coordinates.
    sparse: the run's :class:`dpmega.train.sparse_tables.SparseRun`, or None. With it, σ is the sparse step's
      σ_eff (what the ledger records); the plan shows its split into σ1 and σ2.
  """

  def __init__(self, cfg: config_lib.TrainConfig, *, dataset_size: int, batch_sizes: np.ndarray,
               tail: truncation.TailModel, sparse: Any = None):
    self.cfg = cfg
    self.sparse = sparse  # dpmega.train.sparse_tables.SparseRun or None
    self.dataset_size = dataset_size
    self.batch_sizes = batch_sizes
    self.tail = tail
    # Every step that releases something: training, then the recalibration's at the final batch size (the
    # schedule object's ramp is pinned to num_steps, so its batch sizes go on at the final size).
    self.recalibration_steps = cfg.recalibration.steps
    self.total_steps = cfg.num_steps + self.recalibration_steps
    self.plan = accounting.Plan(dataset_size=dataset_size, schedule=cfg.batch_schedule, num_steps=self.total_steps,
                                delta=cfg.delta, scheme=cfg.sampling, accountant=cfg.accountant, tail=tail)

  def _refuse_simulation(self) -> None:
    """An effective-noise simulation (``simulate_k``) has no ledger and no epsilon (:mod:`dpmega.train.simulation`)."""
    if getattr(self.cfg, "simulate_k", 0):
      raise RuntimeError("an effective-noise simulation (simulate_k > 0) is NOT private: it keeps no ledger and "
                         "has no epsilon")

  def accounted(self, sigma: float) -> float:
    """The noise multiplier the ledger records for a step at gradient noise ``sigma``."""
    return effective_noise_multiplier(sigma, self.cfg.clipped_count_noise)

  def epsilon(self, ledger: accounting.Ledger) -> float:
    """epsilon(delta) of ``ledger``, delta covering the sampler's bounded support (delta_tail)."""
    self._refuse_simulation()
    return accounting.compute_epsilon(ledger, self.cfg.delta, self.cfg.accountant, tail=self.tail)

  def tail_delta(self, ledger: accounting.Ledger) -> float:
    """delta_tail of the steps of ``ledger`` for this run's sampler and number of noised coordinates."""
    return accounting.tail_delta_of(ledger, self.tail)

  def epsilon_of_prefix(self, num_steps: int, sigma: float) -> float:
    """epsilon(delta) of the schedule's first ``num_steps`` steps at gradient noise ``sigma``."""
    return self.plan.epsilon(self.accounted(sigma), num_steps)

  def expected_ledger(self, num_steps: int, sigma: float) -> accounting.Ledger:
    """The ledger of the schedule's first ``num_steps`` steps at gradient noise ``sigma``."""
    return self.plan.expected_ledger(self.accounted(sigma), num_steps)

  def record(self, ledger: accounting.Ledger, step: int, sigma: float) -> None:
    """Records step ``step`` (0-based) of the schedule at gradient noise ``sigma`` in ``ledger``."""
    self._refuse_simulation()
    ledger.record(batch_size=int(self.batch_sizes[step]), dataset_size=self.dataset_size,
                  noise_multiplier=self.accounted(sigma), scheme=self.cfg.sampling)

  def choose_sigma(self) -> tuple[float, str]:
    """σ of the gradient noise (fixed, or calibrated to the target for the whole schedule) and how it was chosen.

    Raises:
      UsageError: the clipped count's noise leaves no room for the gradient's at the calibrated σ.
    """
    cfg = self.cfg
    if cfg.noise_multiplier is not None:
      budget = cfg.target_epsilon
      return cfg.noise_multiplier, "fixed" + ("" if budget is None else f"; the budget epsilon = {budget:g} stops "
                                              "the run")
    sigma = self.plan.calibrate(cfg.target_epsilon)
    how = f"calibrated to epsilon <= {cfg.target_epsilon:g} for the whole schedule"
    if cfg.clipped_count_noise is not None:
      # The calibrated sigma is what the accountant sees: solve effective_noise_multiplier for the gradient's.
      if not cfg.clipped_count_noise > sigma:
        raise UsageError(f"clipped_count_noise must exceed the calibrated noise multiplier {sigma:.6g} (the "
                         f"count's noise adds to the privacy cost), got {cfg.clipped_count_noise:g}.")
      sigma = (sigma ** -2 - cfg.clipped_count_noise ** -2) ** -0.5
    return sigma, how

  def print_plan(self, sigma: float, how: str, out: Callable[[str], None], *, randomness: str, mesh: Any) -> None:
    """Prints what will run: schedule, sampling, σ, clip norm, mesh, randomness, δ_tail and the ε curve."""
    cfg = self.cfg
    n, sizes = self.dataset_size, self.batch_sizes
    out(f"plan: {cfg.num_steps} steps of batch schedule {cfg.batch_schedule.to_spec()} over "
        f"N = {fmt_int(n)} examples (q from {sizes.min() / n:.4g} to {sizes.max() / n:.4g}), "
        f"{cfg.sampling.value.replace('_', ' ')} sampling, {cfg.accountant.upper()} accountant")
    if self.recalibration_steps:
      out(f"plan: then {self.recalibration_steps} recalibration steps (temperature and bias, clip norm "
          f"{cfg.recalibration.clip_norm:g}) at batch {fmt_int(sizes[-1])} and the same sigma: accounted as steps "
          f"{cfg.num_steps + 1}-{self.total_steps}")
    out(f"plan: noise multiplier sigma = {sigma:.6g} ({how}), clip norm C = {cfg.clip_norm:g}, "
        f"micro-batch {cfg.microbatch_size} x {cfg.max_microbatches} per jitted call")
    shape = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
    out(f"plan: mesh {shape} over {mesh.devices.size} device(s) of {mesh.devices.flat[0].platform}")
    out(f"plan: randomness {randomness}")
    if cfg.clip_groups or cfg.normalized_clipping:
      groups = ", ".join(f"{pattern!r} C*{share ** 0.5:.4g}" for pattern, share in cfg.clip_groups)
      out("plan: clipping " + (f"normalized (C*g/(||g|| + {cfg.clip_stability:g}*C))" if cfg.normalized_clipping
                               else "min(1, C/||g||)") + (f" per group: {groups}" if groups else "")
          + "; each example's whole contribution stays <= C")
    if self.sparse is not None:
      out("plan: " + self.sparse.describe(sigma))
    if cfg.clipped_count_noise is not None:
      out(f"plan: metrics private; the clipped count gets noise sigma_b = {cfg.clipped_count_noise:g} "
          f"(sensitivity 1): every step is accounted at sigma_eff = {self.accounted(sigma):.6g}")
    delta_tail = self.plan.tail_delta(self.accounted(sigma), floor=True)
    if delta_tail > 1e-3 * cfg.delta:
      out(f"plan: the {cfg.noise_sampler} noise sampler's bounded support costs delta_tail = {delta_tail:.3g} "
          f"over the whole schedule ({fmt_int(self.tail.num_coordinates)} noised coordinates), included in "
          f"delta = {cfg.delta:g}" + ("" if delta_tail < cfg.delta else ": no finite epsilon holds at this delta"))
    points = sorted({max(1, round(cfg.num_steps * f)) for f in (0.1, 0.25, 0.5, 0.75, 1.0)} | {self.total_steps})
    curve = [(p, self.epsilon_of_prefix(p, sigma)) for p in points]
    out("plan: expected epsilon after step " + ", ".join(f"{p}: {e:.4g}" for p, e in curve) +
        f" (delta = {cfg.delta:g}, {cfg.sampling.relation_label} neighbours)")
    if self.plan.delta_warning():
      out(f"plan: {self.plan.delta_warning()}")
    if cfg.target_epsilon is not None and curve[-1][1] > cfg.target_epsilon:
      k = self.plan.max_steps(cfg.target_epsilon, self.accounted(sigma))
      out(f"plan: the budget epsilon = {cfg.target_epsilon:g} allows only {k} of the {self.total_steps} "
          f"steps; training will stop before step {k + 1}")

  def needs_checks(self, spent: accounting.Ledger, ledger: accounting.Ledger, sigma: float) -> bool:
    """Whether the budget must be checked before each step.

    Every prefix of the schedule costs at most the whole schedule (ε is monotone in steps), so per-step
    checks are needed only when the whole schedule does not fit, or when the workdir spent steps that are
    not on this model's trajectory (a rewind's discarded steps, an earlier run's).
    """
    cfg = self.cfg
    return cfg.target_epsilon is not None and (
        spent.num_steps > ledger.num_steps or self.epsilon_of_prefix(self.total_steps, sigma) > cfg.target_epsilon)

  def budget_stop(self, spent: accounting.Ledger, step: int, sigma: float, epsilon: float) -> str | None:
    """Why step ``step`` (0-based) must not run -- it would take the workdir past the target -- or None."""
    cfg = self.cfg
    expected = int(self.batch_sizes[step])
    if accounting.fits_budget(spent, next_batch_size=expected, dataset_size=self.dataset_size,
                              noise_multiplier=self.accounted(sigma), scheme=cfg.sampling,
                              target_epsilon=cfg.target_epsilon, delta=cfg.delta, accountant=cfg.accountant,
                              tail=self.tail):
      return None
    trial = spent.copy()
    self.record(trial, step, sigma)
    return (f"privacy budget: stopped before step {step + 1} of {self.total_steps}, which would take the workdir's "
            f"epsilon from {epsilon:.4g} to {self.epsilon(trial):.4g} > target {cfg.target_epsilon:g} "
            f"(delta = {cfg.delta:g})")
