"""The run: :class:`Trainer` (plan, restore, loop, checkpoint, summary), :class:`TrainResult`, :func:`train`.

Reads top to bottom like the step it runs (see :mod:`dpmega.train` for the whole story): plan the privacy of
the configured schedule (:class:`dpmega.accounting.Plan`), restore or start, then per logical step sample,
stream the chunks through :mod:`dpmega.train.step`'s accumulate, journal the step, add the one noise draw and
update, record the ledger, log and checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpmega import accounting
from dpmega.train import checkpoint as checkpoint_lib
from dpmega.train import config as config_lib
from dpmega.train import identity
from dpmega.accounting import journal as journal_lib
from dpmega import noise as noise_lib
from dpmega import truncation
from dpmega import sampling
from dpmega import sharding
from dpmega.data import sources as sources_lib
from dpmega.errors import UsageError
from dpmega.tasks import Task
from dpmega.tasks import build_task
from dpmega.train import randomness as randomness_lib
from dpmega.train import step as step_lib
from dpmega.train.optim import make_optimizer
from dpmega.train.randomness import run_secret
from dpmega.train.step import TrainState
from dpmega.train.step import effective_noise_multiplier
from dpmega.train.writer import MetricsWriter
from dpmega.train.writer import NullWriter

PyTree = Any



class TrainingError(RuntimeError):
  """Training cannot go on (diverged, or the workdir cannot be written); the message says what to do."""


@dataclasses.dataclass
class TrainResult:
  """What a run ended with.

  Attributes:
    steps: logical steps completed (counting those before a resume).
    epsilon: epsilon(delta) the workdir has spent: every distinct (generation, step) in its journal,
      including steps a rewind discarded. Never decreases over the workdir's history.
    delta: the delta.
    noise_multiplier: sigma used at every step.
    stop_reason: why the run ended before ``num_steps`` (budget), else None.
    eval_metrics: the task's evaluation at the end.
    params: the final parameters (host arrays).
    ledger: the ledger of the steps that led to the final model (its trajectory).
    history: the per-step records written to ``metrics.jsonl`` by this process.
    trajectory_epsilon: epsilon(delta) of ``ledger`` alone (<= ``epsilon``).
    spent: the workdir's ledger (what ``epsilon`` is computed from).
    delta_tail: the part of ``delta`` that the noise sampler's bounded support costs over ``spent``.
    generation: the generation the final steps ran in (0 unless a rewind or change started a new one).
  """

  steps: int
  epsilon: float
  delta: float
  noise_multiplier: float
  stop_reason: str | None
  eval_metrics: dict[str, float]
  params: PyTree
  ledger: accounting.Ledger
  history: list[dict[str, Any]]
  trajectory_epsilon: float | None = None
  spent: accounting.Ledger | None = None
  delta_tail: float = 0.0
  generation: int = 0


def _fmt_int(n: int) -> str:
  return f"{int(n):,}"


class Trainer:
  """Runs one configured private training job (see the module docstring).

  Args:
    cfg: the validated trainer config.
    task: the model, loss, data and evaluation.
    out: where progress lines go (default: stdout).
    config_dict: the full config, saved as ``config.json`` in the workdir.
  """

  def __init__(self, cfg: config_lib.TrainConfig, task: Task, *, out: Callable[[str], None] | None = None,
               config_dict: ml_collections.ConfigDict | None = None):
    self.cfg = cfg
    self.task = task
    self.out = out or (lambda s: print(s, flush=True))
    self.config_dict = config_dict
    self.dataset_size = len(task.train_source)
    config_lib.validate_against_dataset(cfg, self.dataset_size)
    self.batch_sizes = cfg.batch_schedule.batch_sizes(cfg.num_steps)
    # Public by design: the initialization does not depend on the data (the module docstring).
    # fold_in(., 0): the initialization stream of earlier versions, so a config initializes as it did.
    self.init_key = jax.random.fold_in(jax.random.key(cfg.init_seed), 0)
    self.randomness = randomness_lib.describe(cfg)
    self.sampler = None
    self._set_randomness(run_secret(cfg), generation=0)
    self.optimizer = make_optimizer(cfg.optimizer, cfg.num_steps)
    self.num_traces = 0
    # delta_tail (invariant 8) depends on how many coordinates get noise: every parameter, plus the count.
    shapes = jax.eval_shape(task.init_params, self.init_key)
    num_noised = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    self.tail = truncation.TailModel(noise_lib.sampler_support(cfg.noise_sampler),
                                     max(1, num_noised + (cfg.clipped_count_noise is not None)))
    self._tail = {"tail": self.tail}
    self.journal: journal_lib.Journal | None = None
    self.spent = accounting.Ledger()  # every distinct (generation, step) of the workdir's journal
    self._data_fingerprint: dict[str, Any] | None = None
    # The one private step (dpmega.train.step), on a mesh: cfg.mesh, or 1 x 1 (one device).
    if cfg.mesh is None and jax.process_count() > 1:
      raise UsageError(f"{jax.process_count()} processes need a mesh: set mesh.enabled=True.")
    mesh_config = cfg.mesh or sharding.MeshConfig(data=1)
    try:
      self.mesh = sharding.make_mesh(mesh_config)
    except ValueError as e:
      raise UsageError(f"mesh: {e}") from None
    self.private_step = step_lib.make_private_step(
        task.loss_fn, self.optimizer, self.mesh, shapes, clip_norm=cfg.clip_norm,
        microbatch_size=cfg.microbatch_size, max_microbatches=cfg.max_microbatches, has_aux=task.has_aux,
        clipping=cfg.clipping, noise_sampler=cfg.noise_sampler, clipped_count_noise=cfg.clipped_count_noise,
        min_shard_size=mesh_config.min_shard_size, on_trace=self._count_trace)
    self.accumulate = self.private_step.accumulate
    self.apply_update = self.private_step.update
    if jax.process_index() != 0:
      self.out = lambda s: None

  def _evaluate(self, params) -> dict[str, float]:
    # The task sees arrays this process can read: params sharded across processes are gathered first.
    local = all(x.is_fully_addressable for x in jax.tree_util.tree_leaves(params))
    return self.task.evaluate(params if local else sharding.to_host(params))

  def _count_trace(self) -> None:
    self.num_traces += 1

  def _set_randomness(self, secret: bytes, *, generation: int) -> None:
    """Keys the noise, the sampler and the data preparation by ``(secret, generation)``; keeps the position."""
    self.secret = noise_lib.validate_secret(secret)
    self.generation = generation
    position = 0 if self.sampler is None else self.sampler.position
    self.sampler = sampling.make_sampler(self.cfg.sampling, self.dataset_size, secret=self.secret,
                                         generation=generation, position=position)

  def noise_key(self, step: int) -> jax.Array:
    """Step ``step``'s noise key: a PRF of the run's secret, never logged."""
    return noise_lib.step_key(self.secret, step, generation=self.generation)

  def _config_json(self) -> str:
    record = json.loads(self.config_dict.to_json())
    record["randomness"] = self.randomness  # says whether the noise is secret; holds no key material
    return json.dumps(record, indent=2)

  # ------------------------------------------------------------------ setup
  def initial_state(self) -> TrainState:
    params = self.task.init_params(self.init_key)
    return self.private_step.shard_state(TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(params)))

  def fingerprint(self, noise_multiplier: float) -> dict[str, dict[str, Any]]:
    """The run's :func:`dpmega.train.identity.fingerprint` (the dataset is hashed once per trainer)."""
    if self._data_fingerprint is None:
      self._data_fingerprint = sources_lib.fingerprint(self.task.train_source)
    task = self.config_dict.task.to_dict() if self.config_dict is not None else {"name": self.cfg.task_name}
    return identity.fingerprint(self.cfg, task_config=task, data=self._data_fingerprint,
                                noise_multiplier=noise_multiplier)

  def _accounted(self, sigma: float) -> float:
    """The noise multiplier the ledger records for a step at gradient noise ``sigma``."""
    return effective_noise_multiplier(sigma, self.cfg.clipped_count_noise)

  def _epsilon(self, ledger: accounting.Ledger) -> float:
    """epsilon(delta) of ``ledger``, delta covering the sampler's bounded support (delta_tail)."""
    return accounting.compute_epsilon(ledger, self.cfg.delta, self.cfg.accountant, **self._tail)

  def tail_delta(self, ledger: accounting.Ledger) -> float:
    """delta_tail of the steps of ``ledger`` for this run's sampler and number of noised coordinates."""
    return accounting.tail_delta_of(ledger, self.tail)

  def _epsilon_of_prefix(self, num_steps: int, sigma: float) -> float:
    """epsilon(delta) of the schedule's first ``num_steps`` steps at gradient noise ``sigma`` (after ``plan``)."""
    return self.privacy.epsilon(self._accounted(sigma), num_steps)

  def plan(self) -> float:
    """Chooses sigma (fixed, or calibrated to the target for the whole schedule) and prints the plan."""
    cfg = self.cfg
    # What will run, accounted as `dpmega epsilon` / `dpmega calibrate` account it (dpmega.accounting.plan).
    self.privacy = accounting.Plan(dataset_size=self.dataset_size, schedule=cfg.batch_schedule,
                                   num_steps=cfg.num_steps, delta=cfg.delta, scheme=cfg.sampling,
                                   accountant=cfg.accountant, tail=self.tail)
    if cfg.noise_multiplier is not None:
      sigma, how = cfg.noise_multiplier, "fixed"
    else:
      sigma = self.privacy.calibrate(cfg.target_epsilon)
      how = f"calibrated to epsilon <= {cfg.target_epsilon:g} for the whole schedule"
      if cfg.clipped_count_noise is not None:
        # The calibrated sigma is what the accountant sees: solve effective_noise_multiplier for the gradient's.
        if not cfg.clipped_count_noise > sigma:
          raise UsageError(f"clipped_count_noise must exceed the calibrated noise multiplier {sigma:.6g} (the "
                           f"count's noise adds to the privacy cost), got {cfg.clipped_count_noise:g}.")
        sigma = (sigma ** -2 - cfg.clipped_count_noise ** -2) ** -0.5
    n, sizes = self.dataset_size, self.batch_sizes
    self.out(f"plan: {cfg.num_steps} steps of batch schedule {cfg.batch_schedule.to_spec()} over "
             f"N = {_fmt_int(n)} examples (q from {sizes.min() / n:.4g} to {sizes.max() / n:.4g}), "
             f"{cfg.sampling.value.replace('_', ' ')} sampling, {cfg.accountant.upper()} accountant")
    self.out(f"plan: noise multiplier sigma = {sigma:.6g} ({how}), clip norm C = {cfg.clip_norm:g}, "
             f"micro-batch {cfg.microbatch_size} x {cfg.max_microbatches} per jitted call")
    self.out(f"plan: randomness {self.randomness}")
    if cfg.clipped_count_noise is not None:
      self.out(f"plan: metrics private; the clipped count gets noise sigma_b = {cfg.clipped_count_noise:g} "
               f"(sensitivity 1): every step is accounted at sigma_eff = {self._accounted(sigma):.6g}")
    delta_tail = self.privacy.tail_delta(self._accounted(sigma), floor=True)
    if delta_tail > 1e-3 * cfg.delta:
      self.out(f"plan: the {cfg.noise_sampler} noise sampler's bounded support costs delta_tail = {delta_tail:.3g} "
               f"over the whole schedule ({_fmt_int(self.tail.num_coordinates)} noised coordinates), included in "
               f"delta = {cfg.delta:g}" + ("" if delta_tail < cfg.delta else ": no finite epsilon holds at this delta"))
    points = sorted({max(1, round(cfg.num_steps * f)) for f in (0.1, 0.25, 0.5, 0.75, 1.0)})
    curve = [(p, self._epsilon_of_prefix(p, sigma)) for p in points]
    self.out("plan: expected epsilon after step " + ", ".join(f"{p}: {e:.4g}" for p, e in curve) +
             f" (delta = {cfg.delta:g}, {cfg.sampling.relation_label} neighbours)")
    if cfg.target_epsilon is not None and curve[-1][1] > cfg.target_epsilon:
      k = self.privacy.max_steps(cfg.target_epsilon, self._accounted(sigma))
      self.out(f"plan: the budget epsilon = {cfg.target_epsilon:g} allows only {k} of the {cfg.num_steps} "
               f"steps; training will stop before step {k + 1}")
    return sigma

  def _expected_ledger(self, num_steps: int, sigma: float) -> accounting.Ledger:
    """The ledger of the schedule's first ``num_steps`` steps at gradient noise ``sigma`` (after ``plan``)."""
    return self.privacy.expected_ledger(self._accounted(sigma), num_steps)

  def _checkpoint_tree(self, state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": noise_lib.secret_to_words(self.secret)}

  def _save(self, ckpt: checkpoint_lib.Checkpointer, state: TrainState, ledger: accounting.Ledger,
            sigma: float, epsilon: float) -> None:
    step = int(state.step)
    ckpt.save(step, sharding.to_host(self._checkpoint_tree(state)), {
        "ledger": ledger.to_dict(), "sampler": self.sampler.state.to_dict(), "fingerprint": self.fingerprint(sigma),
        "generation": self.generation, "epsilon": epsilon,
    })

  def _restore(self, ckpt: checkpoint_lib.Checkpointer, template: TrainState, sigma: float,
               resume_step: int | None) -> tuple[TrainState, accounting.Ledger]:
    tree, meta = ckpt.restore(self._checkpoint_tree(template), step=resume_step)
    step = int(tree["step"])
    where = f"checkpoint at step {step} in {ckpt.directory}"
    mine, theirs = self.fingerprint(sigma), meta.get("fingerprint")
    if not isinstance(theirs, dict) or set(theirs) != set(mine):
      raise checkpoint_lib.CheckpointError(f"{where} has no fingerprint of its computation (written by an older "
                                           "dpmega): it cannot be resumed safely; start afresh with --overwrite.")
    refused = identity.differences(theirs["computation"], mine["computation"])
    if refused:
      detail = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in refused)
      raise checkpoint_lib.CheckpointError(
          f"{where} was computed differently, so resuming would redo steps with its noise keys and samples on "
          f"another computation ({detail}). Resume with the checkpoint's settings, or start a new run in another "
          "workdir.")
    self._resumed = {"step": step, "generation": int(meta.get("generation", 0)),
                     "changed": [k for part in ("optimizer", "environment")
                                 for k, _, _ in identity.differences(theirs[part], mine[part], prefix=part + ".")]}
    try:
      secret = noise_lib.secret_from_words(np.asarray(tree["rng"], np.uint32))
    except ValueError:
      # Earlier versions stored the key of a public seed here: that run's noise was never secret.
      raise checkpoint_lib.CheckpointError(
          f"{where} holds no secret of at least 128 bits (got {np.size(tree['rng'])} uint32 words; "
          "checkpoints written before the noise key became secret hold a public seed's key): "
          "start afresh with --overwrite or a new workdir.") from None
    if self.cfg.insecure_reproducible_seed is not None and secret != self.secret:
      raise checkpoint_lib.CheckpointError(f"{where} holds the secret of another insecure_reproducible_seed.")
    self._set_randomness(secret, generation=self.generation)  # the run's secret: a resume redoes, never re-keys
    ledger = accounting.Ledger.from_dict(meta["ledger"])
    # Invariant: the ledger is exactly the steps that ran, and they are the schedule's.
    if ledger.num_steps != step or ledger != self._expected_ledger(step, sigma):
      raise checkpoint_lib.CheckpointError(
          f"{where} has a ledger of {ledger.num_steps} steps that does not match the schedule's first {step} "
          "steps at this noise multiplier.")
    sampler_state = sampling.SamplerState.from_dict(meta["sampler"])
    self.sampler.restore(sampler_state)
    if self.sampler.position != step:
      raise checkpoint_lib.CheckpointError(f"{where} has sampler position {self.sampler.position} != step {step}.")
    state = TrainState(jnp.asarray(tree["step"], jnp.int32), tree["params"], tree["opt_state"])
    return self.private_step.shard_state(state), ledger

  # ------------------------------------------------------------------ steps
  def train_step(self, state: TrainState, sigma: float) -> tuple[TrainState, dict[str, Any]]:
    """One logical step at ``state.step``: sample, stream chunks, noise once, update."""
    cfg = self.cfg
    t = int(state.step)
    if self.sampler.position != t:
      raise RuntimeError(f"sampler position {self.sampler.position} != step {t}.")
    expected = int(self.batch_sizes[t])
    indices = self.sampler.sample(expected)
    prepare_key = noise_lib.prepare_key(self.secret, t, generation=self.generation)

    def prepare(i, batch):  # one key per (chunk, process): each process prepares its own rows
      return self.task.prepare_batch(batch, jax.random.fold_in(prepare_key, i * jax.process_count() +
                                                               jax.process_index()))

    # Every process drew the same global sample; each reads only its share.
    chunks = self.private_step.chunks(self.task.train_source, indices)
    acc = self.private_step.clipped_sum(state.params, chunks, None if self.task.prepare_batch is None else prepare)
    self._spend(t, expected, sigma)  # durably in the journal BEFORE the noisy update exists
    key = self.noise_key(t)
    state, update_metrics = self.apply_update(state, acc.grad_sum, key, sigma, expected, acc.stats.num_clipped)
    metrics = {"batch_size": expected, "q": expected / self.dataset_size}
    if cfg.metrics is config_lib.MetricsMode.RAW:
      # Raw statistics of the private batch, WITHOUT noise: for the operator, never for release.
      stats = jax.device_get(acc.stats)
      n = int(stats.num_examples)
      metrics.update({
          "sampled": len(indices), "loss": float(stats.loss_sum) / max(n, 1),
          "clipped_fraction": int(stats.num_clipped) / max(n, 1), "nonfinite": int(stats.num_nonfinite),
          "mean_grad_norm": float(stats.norm_sum) / max(n, 1),
      })
    update_metrics = {k: float(v) for k, v in jax.device_get(update_metrics).items()}
    count = update_metrics.pop("noisy_clipped_count", None)
    if count is not None:
      # Over the EXPECTED batch size (public): unbiased, not clamped, so it may leave [0, 1].
      metrics["private_clipped_fraction"] = count / expected
    metrics.update(update_metrics)
    return state, metrics

  def _spend(self, step: int, expected: int, sigma: float) -> None:
    """Records step ``step`` of this generation in the journal and the workdir's spent ledger (once)."""
    if self.journal is None:
      return
    if self.journal.record_step(generation=self.generation, step=step, batch_size=expected,
                                dataset_size=self.dataset_size, noise_multiplier=self._accounted(sigma),
                                scheme=self.cfg.sampling):
      self.spent.record(batch_size=expected, dataset_size=self.dataset_size,
                        noise_multiplier=self._accounted(sigma), scheme=self.cfg.sampling)

  # ------------------------------------------------------------------ run
  def run(self, *, resume: bool = False, resume_step: int | None = None, overwrite: bool = False) -> TrainResult:
    """Trains to ``num_steps`` (or the budget); checkpoints, logs, evaluates; returns the result.

    Args:
      resume: continue from the newest checkpoint in the workdir (exactly: same
        batches, keys, ledger); without it, a workdir holding checkpoints is an error.
      resume_step: continue from this checkpoint instead of the newest (newer
        ones are set aside, not deleted).
      overwrite: start afresh, deleting the workdir's checkpoints of an earlier run.
    """
    cfg = self.cfg
    if overwrite and (resume or resume_step is not None):
      raise UsageError("overwrite and resume exclude each other: pick one.")
    if overwrite:
      for name in ("checkpoints", "checkpoints.set_aside"):
        shutil.rmtree(os.path.join(cfg.workdir, name), ignore_errors=True)
      # The one place the journal of spent privacy is deleted: the operator discards the run's history.
      if os.path.exists(os.path.join(cfg.workdir, journal_lib.FILENAME)) and jax.process_index() == 0:
        os.remove(os.path.join(cfg.workdir, journal_lib.FILENAME))
    os.makedirs(cfg.workdir, exist_ok=True)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(cfg.workdir, "checkpoints"), max_to_keep=cfg.keep_checkpoints)
    try:
      return self._run(ckpt, resume=resume or resume_step is not None, resume_step=resume_step)
    finally:
      ckpt.close()

  def _run(self, ckpt: checkpoint_lib.Checkpointer, *, resume: bool, resume_step: int | None) -> TrainResult:
    cfg = self.cfg
    main = jax.process_index() == 0  # with several processes, process 0 writes the files
    existing = ckpt.steps()
    if existing and not resume:
      raise UsageError(f"workdir {cfg.workdir!r} already holds checkpoints {existing}: pass --resume to "
                       "continue that run, --overwrite to start afresh, or choose another --workdir.")
    if resume and not existing:
      raise checkpoint_lib.CheckpointError(f"--resume: no checkpoint in {ckpt.directory}.")
    sigma = self.plan()
    state = self.initial_state()
    ledger = accounting.Ledger()
    restored_at = None
    # Every process reads the journal before process 0 appends to it, so all decide the same generation.
    self.journal = journal_lib.Journal(cfg.workdir, writable=main)
    self.spent = self.journal.ledger()
    digest = identity.digest(self.fingerprint(sigma))
    latest = self.journal.latest_generation
    if resume:
      for path in ckpt.unfinished():
        self.out(f"ignoring an unfinished checkpoint save (interrupted): {path}")
      state, ledger = self._restore(ckpt, state, sigma, resume_step)
      restored_at = int(state.step)
      generation, reason = self._resume_generation(latest, newest=existing[-1], digest=digest)
      sharding.sync_processes("dpmega_journal_read")
      if reason is not None:
        self.journal.start_generation(generation, from_step=restored_at, from_generation=self._resumed["generation"],
                                      fingerprint=digest, reason=reason)
      self._set_randomness(self.secret, generation=generation)
      moved = ckpt.set_aside_after(restored_at) if main else []
      sharding.sync_processes("dpmega_set_aside")  # then every process sees the same checkpoints
      ckpt.steps()
      trajectory = self._epsilon(ledger)
      total = self._epsilon(self.spent)
      self.out(f"resumed from the checkpoint at step {restored_at}: epsilon spent by this workdir so far {total:.4g} "
               f"over {self.spent.num_steps} computed steps" +
               (f" (this model's {restored_at} steps alone: {trajectory:.4g})" if total != trajectory else "") +
               (f"; newer checkpoints set aside in {os.path.dirname(moved[0])}" if moved else ""))
      if reason is not None:
        self.out(f"generation {generation} ({reason}): the steps after {restored_at} get new noise keys and new "
                 "samples, and the workdir's epsilon counts them again")
    else:
      # A fresh run in a workdir that already spent (a run that died before its first checkpoint) keeps
      # counting: only --overwrite deletes the journal.
      generation = 0 if latest is None else latest["generation"] + 1
      sharding.sync_processes("dpmega_journal_read")
      self.journal.start_generation(generation, from_step=0, from_generation=None, fingerprint=digest,
                                    reason="a new run" if latest is None else "a new run in a workdir that spent")
      self._set_randomness(self.secret, generation=generation)
      if self.spent.num_steps:
        self.out(f"this workdir already spent epsilon {self._epsilon(self.spent):.4g} over "
                 f"{self.spent.num_steps} steps of an earlier run (its journal {self.journal.path}); they keep "
                 "counting (--overwrite discards them)")
    if self.config_dict is not None and main:
      with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
        f.write(self._config_json())
    writer = (MetricsWriter(cfg.workdir, resume_step=restored_at, tensorboard=cfg.tensorboard) if main
              else NullWriter())
    # Every prefix of the schedule costs at most the whole schedule (epsilon is
    # monotone in steps), so per-step budget checks are needed only when the
    # whole schedule does not fit.
    # Steps already spent by the workdir (a rewind's discarded steps) count too.
    needs_checks = cfg.target_epsilon is not None and (
        self.spent.num_steps > ledger.num_steps or self._epsilon_of_prefix(cfg.num_steps, sigma) > cfg.target_epsilon)
    epsilon = self._epsilon(self.spent)
    history, stop_reason, eval_metrics = [], None, {}
    last_saved = restored_at
    try:
      while int(state.step) < cfg.num_steps:
        t = int(state.step)
        expected = int(self.batch_sizes[t])
        replay = (self.generation, t) in self.journal.steps()  # a bit-identical replay spends nothing new
        if needs_checks and not replay and not accounting.fits_budget(
            self.spent, next_batch_size=expected, dataset_size=self.dataset_size,
            noise_multiplier=self._accounted(sigma), scheme=cfg.sampling, target_epsilon=cfg.target_epsilon,
            delta=cfg.delta, accountant=cfg.accountant, **self._tail):
          trial = self.spent.copy()
          trial.record(batch_size=expected, dataset_size=self.dataset_size, noise_multiplier=self._accounted(sigma),
                       scheme=cfg.sampling)
          stop_reason = (f"privacy budget: stopped before step {t + 1} of {cfg.num_steps}, which would take "
                         f"the workdir's epsilon from {epsilon:.4g} to {self._epsilon(trial):.4g} > target "
                         f"{cfg.target_epsilon:g} (delta = {cfg.delta:g})")
          self.out(stop_reason)
          break
        start = time.perf_counter()
        state, metrics = self.train_step(state, sigma)
        jax.block_until_ready(state.params)
        seconds = time.perf_counter() - start
        ledger.record(batch_size=expected, dataset_size=self.dataset_size, noise_multiplier=self._accounted(sigma),
                      scheme=cfg.sampling)
        step = t + 1
        epsilon = self._epsilon(self.spent)
        record = {"step": step, "generation": self.generation, **metrics, "sigma": sigma, "epsilon": epsilon,
                  "delta": cfg.delta}
        if cfg.metrics is config_lib.MetricsMode.RAW:
          # Under Poisson sampling the step's time follows the realized batch size: raw mode only.
          record.update(seconds=seconds, examples_per_s=metrics["sampled"] / max(seconds, 1e-9))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
          record.update({f"eval_{k}": v for k, v in self._evaluate(state.params).items()})
        history.append(record)
        self._check_finite(metrics, step, last_saved)
        self._guarded(writer.write, record, what=writer.path, last_saved=last_saved)
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.num_steps):
          self.out(self._progress_line(record))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.num_steps:
          self._guarded(self._save, ckpt, state, ledger, sigma, epsilon, what=f"the checkpoint of step {step}",
                        last_saved=last_saved)
          last_saved = step
      final_step = int(state.step)
      if last_saved != final_step:
        self._guarded(self._save, ckpt, state, ledger, sigma, epsilon, what=f"the checkpoint of step {final_step}",
                      last_saved=last_saved)
        last_saved = final_step
      eval_metrics = self._evaluate(state.params)
      self._guarded(writer.write, {"step": final_step, "final": True, "epsilon": epsilon, "delta": cfg.delta,
                                   **{f"eval_{k}": v for k, v in eval_metrics.items()}},
                    what=writer.path, last_saved=last_saved)
    finally:
      writer.close()
    trajectory = self._epsilon(ledger)
    delta_tail = self.tail_delta(self.spent)
    summary = {
        "steps": final_step, "num_steps": cfg.num_steps, "epsilon": epsilon, "delta": cfg.delta,
        "delta_tail": delta_tail, "noise_sampler": cfg.noise_sampler,
        "neighbouring_relation": cfg.sampling.relation_label, "sampling": cfg.sampling.value,
        "accountant": cfg.accountant, "noise_multiplier": sigma, "clip_norm": cfg.clip_norm,
        "accounted_noise_multiplier": self._accounted(sigma), "clipped_count_noise": cfg.clipped_count_noise,
        "metrics": cfg.metrics.value, "stop_reason": stop_reason, "eval": eval_metrics,
        "generation": self.generation, "trajectory_epsilon": trajectory, "ledger": ledger.to_dict(),
        "spent_steps": self.spent.num_steps, "spent_ledger": self.spent.to_dict(),
        "randomness": self.randomness,
    }
    if main:
      with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    self.out(f"done: {final_step} steps, " + accounting.describe(epsilon, cfg.delta, cfg.sampling, cfg.accountant) +
             (f"; delta_tail {delta_tail:.3g} included" if delta_tail > 1e-3 * cfg.delta else "") +
             (f"; spent by the workdir over {self.spent.num_steps} computed steps (this model's trajectory alone: "
              f"{trajectory:.4g})" if self.spent.num_steps != ledger.num_steps else ""))
    self.out("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    return TrainResult(final_step, epsilon, cfg.delta, sigma, stop_reason, eval_metrics,
                       sharding.to_host(state.params), ledger, history, trajectory, self.spent, delta_tail,
                       self.generation)

  def _resume_generation(self, latest: dict[str, Any] | None, *, newest: int, digest: str) -> tuple[int, str | None]:
    return identity.resume_generation(self._resumed, latest, newest=newest, digest=digest,
                                      workdir=self.cfg.workdir, journal_path=self.journal.path)

  @staticmethod
  def _guarded(fn, *args, what: str, last_saved: int | None):
    """Runs a write; a failure (disk full, permissions, ...) becomes one clear :class:`TrainingError`."""
    try:
      return fn(*args)
    except Exception as e:  # noqa: BLE001 - Orbax and the OS raise many kinds; all mean the same here
      reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [""])[0][:200]
      where = (f"the last checkpoint is at step {last_saved}: fix the cause and run again with --resume"
               if last_saved else "no checkpoint was written yet")
      raise TrainingError(f"could not write {what} ({type(e).__name__}: {reason}); {where}.") from e

  @staticmethod
  def _check_finite(metrics: dict[str, Any], step: int, last_saved: int | None) -> None:
    """Stops a diverged run before it is logged or checkpointed, keeping the last good checkpoint.

    The decision reads only the new parameters: a function of the released
    noisy update (post-processing). Examples with non-finite gradients do not
    stop the run -- they contribute zero and are counted (invariant 4) -- since
    a stop that depends on how many of them were sampled would be a release of
    raw private data.
    """
    if metrics["params_finite"] == 1.0:
      return
    keep = (f"the last good checkpoint is at step {last_saved}" if last_saved else "no checkpoint was written")
    raise TrainingError(f"training diverged at step {step}: the parameters are not finite (nan or inf); nothing of "
                        f"this step was saved and {keep}. Lower the learning rate and resume: the steps after the "
                        "checkpoint then run in a new generation, with new noise keys, and count again.")

  def _progress_line(self, r: dict[str, Any]) -> str:
    if self.cfg.metrics is config_lib.MetricsMode.PRIVATE:
      line = (f"step {r['step']}/{self.cfg.num_steps}  batch {_fmt_int(r['batch_size'])} (expected)  noisy grad "
              f"norm {r['noisy_grad_norm']:.4g}  update norm {r['update_norm']:.4g}" +
              (f"  clipped ~{100 * r['private_clipped_fraction']:.0f}% (noisy)" if "private_clipped_fraction" in r
               else "") + f"  epsilon {r['epsilon']:.4g}")
    else:
      line = (f"step {r['step']}/{self.cfg.num_steps}  batch {_fmt_int(r['batch_size'])} (drew "
              f"{_fmt_int(r['sampled'])})  {r['examples_per_s']:,.0f} ex/s  loss {r['loss']:.4f}  "
              f"clipped {100 * r['clipped_fraction']:.0f}%  epsilon {r['epsilon']:.4g}")
    evals = {k[5:]: v for k, v in r.items() if k.startswith("eval_")}
    if evals:
      line += "  eval " + " ".join(f"{k} {v:.4f}" for k, v in evals.items())
    return line


def train(config: ml_collections.ConfigDict, *, resume: bool = False, resume_step: int | None = None,
          overwrite: bool = False, out: Callable[[str], None] | None = None) -> TrainResult:
  """Validates ``config``, builds its task and trains (see :class:`Trainer`).

  Raises:
    UsageError: a bad config field (before any compute), or a checkpoint
      problem on resume (:class:`dpmega.train.checkpoint.CheckpointError`).
  """
  cfg = config_lib.validate(config)
  try:
    task = build_task(config)
  except UsageError:
    raise
  except (ValueError, TypeError) as e:
    raise UsageError(f"task {cfg.task_name!r}: {e}") from None
  return Trainer(cfg, task, out=out, config_dict=config).run(resume=resume, resume_step=resume_step,
                                                             overwrite=overwrite)
