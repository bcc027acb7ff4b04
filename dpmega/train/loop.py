"""The run, top to bottom: :class:`Trainer` and :func:`train`.

Like big_vision's ``train.py``, :meth:`Trainer.run` reads in banner sections: the workdir (lock, usable,
``--overwrite``), the privacy plan (:mod:`dpmega.train.privacy`), restore or start (:mod:`dpmega.train.resume`:
every check before anything in the workdir is written), the journal's generation, the loop -- per logical step
sample, stream the chunks through :mod:`dpmega.train.step`'s accumulate, journal the step, add the one noise draw
and update, record the ledger, log (:mod:`dpmega.train.report`, :mod:`dpmega.train.writer`) and checkpoint --
and the summary. See :mod:`dpmega.train` for the whole story.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from dpmega import accounting
from dpmega import clipping as clipping_lib
from dpmega import noise as noise_lib
from dpmega import sampling
from dpmega import schedules
from dpmega import sharding
from dpmega import truncation
from dpmega.accounting import journal as journal_lib
from dpmega.data import sources as sources_lib
from dpmega.errors import UsageError
from dpmega.tasks import Task
from dpmega.tasks import build_task
from dpmega.train import adaptive_clip
from dpmega.train import averaging
from dpmega.train import checkpoint as checkpoint_lib
from dpmega.train import config as config_lib
from dpmega.train import identity
from dpmega.train import optim
from dpmega.train import randomness as randomness_lib
from dpmega.train import recalibration
from dpmega.train import report
from dpmega.train import resume as resume_lib
from dpmega.train import simulation
from dpmega.train import sparse_tables
from dpmega.train import step as step_lib
from dpmega.train import workdir as workdir_lib
from dpmega.train.privacy import RunPrivacy
from dpmega.train.report import TrainingError
from dpmega.train.report import TrainResult
from dpmega.train.step import TrainState
from dpmega.train.writer import MetricsWriter
from dpmega.train.writer import NullWriter

__all__ = ["Trainer", "TrainResult", "TrainingError", "train"]


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
    # Every step's expected batch size: training, then the recalibration's (the schedule goes on at its end).
    self.batch_sizes = cfg.batch_schedule.batch_sizes(cfg.num_steps + cfg.recalibration.steps)
    self.full_batch_sizes = self.batch_sizes  # a simulation samples B_t / k and predicts B_t
    if cfg.simulate_k:
      self.batch_sizes = simulation.simulated_batch_sizes(self.full_batch_sizes, cfg.simulate_k)
    # Public by design: the initialization does not depend on the data (the module docstring).
    # fold_in(., 0): the initialization stream of earlier versions, so a config initializes as it did.
    self.init_key = jax.random.fold_in(jax.random.key(cfg.init_seed), 0)
    if cfg.recalibration.steps and task.predict_logits is None:
      raise UsageError(f"recalibration.steps must be 0 for task {task.name!r}: it gives no logits "
                       "(predict_logits), so it is not a binary classifier to recalibrate; got "
                       f"{cfg.recalibration.steps}.")
    if cfg.recalibration.steps and jax.process_count() > 1:
      raise UsageError(f"recalibration.steps must be 0 with several processes ({jax.process_count()}): the "
                       "recalibration runs on one process; recalibrate offline on one host.")
    self.randomness = randomness_lib.describe(cfg)
    self.sampler = None
    self._set_randomness(randomness_lib.run_secret(cfg), generation=0)
    self.optimizer = optim.make_optimizer(cfg.optimizer, cfg.num_steps)
    self.num_traces = 0
    # delta_tail (invariant 8) depends on how many coordinates get noise: every parameter, plus the count.
    shapes = jax.eval_shape(task.init_params, self.init_key)
    self.num_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
    num_noised = self.num_params
    # Sparse tables (dpmega.train.sparse_tables): the selection adds one noisy count per table row.
    self.sparse = sparse_tables.build(cfg.sparse, None if config_dict is None else config_dict.task, shapes)
    num_noised += sparse_tables.count_coordinates(self.sparse)
    self.clip_rule = clipping_lib.ClipRule(normalize=cfg.normalized_clipping, stability=cfg.clip_stability,
                                           groups=cfg.clip_groups)
    try:  # before any compute: a group that matches no parameter, or a parameter in no group
      self.clip_rule.assign([jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]])
    except ValueError as e:
      raise UsageError(str(e)) from None
    tail = truncation.TailModel(noise_lib.sampler_support(cfg.noise_sampler),
                                max(1, num_noised + (cfg.clipped_count_noise is not None)))
    self.privacy = RunPrivacy(cfg, dataset_size=self.dataset_size, batch_sizes=self.full_batch_sizes, tail=tail,
                              sparse=self.sparse)
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
    # Adaptive clipping (dpmega.train.adaptive_clip): the step clips at norm 1 the gradient of loss / C_t and
    # scales by C_t; C_t is train state (checkpointed), moved after each step from the noisy clipped count.
    self.clip_norm_t = float(np.float32(cfg.clip_norm))  # float32 values only: the checkpoint keeps it exactly
    self.private_step = step_lib.make_private_step(
        task.loss_fn, self.optimizer, self.mesh, shapes, clip_norm=1.0 if cfg.adaptive_clip else cfg.clip_norm,
        adaptive=cfg.adaptive_clip,
        microbatch_size=cfg.microbatch_size, max_microbatches=cfg.max_microbatches, has_aux=task.has_aux,
        clipping=cfg.clipping, clip_rule=self.clip_rule, noise_sampler=cfg.noise_sampler,
        clipped_count_noise=cfg.clipped_count_noise,
        min_shard_size=mesh_config.min_shard_size, on_trace=self._count_trace,
        sparse=None if self.sparse is None else self.sparse.spec)
    self.count = None if self.sparse is None else self.sparse.make_count_fn(self.mesh)
    if jax.process_index() != 0:
      self.out = lambda s: None
    self.stage = report.Stage("building the model")  # train() passes its own, which a signal handler reads

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

  def _evaluate(self, params, calibration: dict[str, float] | None = None) -> dict[str, float]:
    # The task sees arrays this process can read: params sharded across processes are gathered first.
    local = all(x.is_fully_addressable for x in jax.tree_util.tree_leaves(params))
    params = params if local else sharding.to_host(params)
    return self.task.evaluate(params) if calibration is None else self.task.evaluate(params, calibration=calibration)

  @staticmethod
  def model_params(state: TrainState):
    """The parameters a run evaluates and returns: the average (``optimizer.ema_decay``), else the last iterate."""
    average = averaging.averaged_params(state.opt_state)
    return state.params if average is None else average

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

  # ------------------------------------------------------------------ checkpoints
  def _checkpoint_tree(self, state: TrainState) -> dict[str, Any]:
    tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": noise_lib.secret_to_words(self.secret)}
    if self.cfg.adaptive_clip:
      tree["clip_norm"] = np.float32(self.clip_norm_t)
    return tree

  def _save(self, ckpt: checkpoint_lib.Checkpointer, state: TrainState, ledger: accounting.Ledger,
            sigma: float, epsilon: float) -> None:
    step = int(state.step)
    ckpt.save(step, sharding.to_host(self._checkpoint_tree(state)), {
        "ledger": ledger.to_dict(), "sampler": self.sampler.state.to_dict(), "fingerprint": self.fingerprint(sigma),
        "generation": self.generation, "epsilon": epsilon,
    })

  def _restore(self, ckpt: checkpoint_lib.Checkpointer, template: TrainState, sigma: float,
               resume_step: int | None) -> tuple[TrainState, accounting.Ledger]:
    """Restores and checks a checkpoint (:mod:`dpmega.train.resume`); reads the workdir, writes nothing."""
    step = resume_step if resume_step is not None else ckpt.latest_step()
    where = f"checkpoint at step {step} in {ckpt.directory}"
    # The fingerprint first: a changed model is named as such, not as an array-structure mismatch.
    changes = resume_lib.check_fingerprint(ckpt.read_meta(step).get("fingerprint"), self.fingerprint(sigma),
                                           where=where)
    tree, meta = ckpt.restore(self._checkpoint_tree(template), step=step)
    self._resumed = {"step": step, "generation": int(meta.get("generation", 0)), **changes}
    secret = resume_lib.checkpoint_secret(tree["rng"], where=where, run_secret=self.secret,
                                          insecure_seed=self.cfg.insecure_reproducible_seed)
    self._set_randomness(secret, generation=self.generation)  # the run's secret: a resume redoes, never re-keys
    ledger = accounting.Ledger.from_dict(meta["ledger"])
    resume_lib.check_ledger(ledger, self.privacy.expected_ledger(step, sigma), step=step, where=where)
    self.sampler.restore(sampling.SamplerState.from_dict(meta["sampler"]))
    if self.sampler.position != step:
      raise checkpoint_lib.CheckpointError(f"{where} has sampler position {self.sampler.position} != step {step}.")
    state = TrainState(jnp.asarray(tree["step"], jnp.int32), tree["params"], tree["opt_state"])
    if self.cfg.adaptive_clip:
      self.clip_norm_t = float(tree["clip_norm"])
    return self.private_step.shard_state(state), ledger

  # ------------------------------------------------------------------ one step
  def sample_step(self, t: int) -> tuple[int, np.ndarray, Callable[[int, Any], Any] | None]:
    """Step ``t``'s expected batch size, its sample (the sampler must stand at ``t``) and its batch
    preparation ``prepare(chunk_index, batch)`` (None when the task has none); training and recalibration
    steps alike."""
    if self.sampler.position != t:
      raise RuntimeError(f"sampler position {self.sampler.position} != step {t}.")
    expected = int(self.batch_sizes[t])
    indices = self.sampler.sample(expected)
    if self.task.prepare_batch is None:
      return expected, indices, None
    prepare_key = noise_lib.prepare_key(self.secret, t, generation=self.generation)

    def prepare(i, batch):  # one key per (chunk, process): each process prepares its own rows
      return self.task.prepare_batch(batch, jax.random.fold_in(prepare_key, i * jax.process_count() +
                                                               jax.process_index()))

    return expected, indices, prepare

  def train_step(self, state: TrainState, sigma: float) -> tuple[TrainState, dict[str, Any]]:
    """One logical step at ``state.step``: sample, stream chunks, noise once, update."""
    cfg = self.cfg
    t = int(state.step)
    expected, indices, prepare = self.sample_step(t)
    # Every process drew the same global sample; each reads only its share.
    chunks = self.private_step.chunks(self.task.train_source, indices)
    adaptive, clip_t = cfg.adaptive_clip, self.clip_norm_t
    acc, counts = self.private_step.clipped_sum_with_counts(  # counts: the sparse tables' rows, chunk by chunk
        state.params, chunks, self.count, None if self.sparse is None else self.sparse.zero_counts(),
        prepare=prepare, clip_norm_t=clip_t if adaptive else None)
    self._spend(t, sigma)  # durably in the journal BEFORE the noisy update exists
    # Adaptive: the step was built with clip norm 1, so noise multiplier sigma * C_t is noise std sigma * C_t.
    state, update_metrics = self.private_step.update(state, acc.grad_sum, self.noise_key(t),
                                                     sigma * clip_t if adaptive else sigma, expected,
                                                     acc.stats.num_clipped, row_counts=counts)
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
    if adaptive:  # post-processing of the noisy count: C_{t+1} for the next step
      metrics["clip_norm"] = clip_t
      self.clip_norm_t = float(np.float32(adaptive_clip.next_clip_norm(
          clip_t, count, expected, target_quantile=cfg.adaptive_clip_quantile, learning_rate=cfg.adaptive_clip_lr)))
    metrics.update(update_metrics)
    return state, metrics

  def _spend(self, step: int, sigma: float) -> None:
    """Records step ``step`` of this generation in the journal and the workdir's spent ledger (once)."""
    if self.journal is None:
      return
    if self.journal.record_step(generation=self.generation, step=step, batch_size=int(self.batch_sizes[step]),
                                dataset_size=self.dataset_size, noise_multiplier=self.privacy.accounted(sigma),
                                scheme=self.cfg.sampling):
      self.privacy.record(self.spent, step, sigma)

  # ------------------------------------------------------------------ the run
  def run(self, *, resume: bool = False, resume_step: int | None = None, overwrite: bool = False,
          stop: threading.Event | None = None) -> TrainResult:
    """Trains to ``num_steps`` (or the budget); checkpoints, logs, evaluates; returns the result.

    Args:
      resume: continue from the newest checkpoint in the workdir (exactly: same
        batches, keys, ledger); without it, a workdir holding checkpoints is an error.
      resume_step: continue from this checkpoint instead of the newest (newer
        ones are set aside, not deleted).
      overwrite: start afresh, deleting the workdir's checkpoints of an earlier run.
      stop: once set (SIGTERM: a preemption), the run ends after the step under way, saving a checkpoint.
    """
    cfg = self.cfg
    if overwrite and (resume or resume_step is not None):
      raise UsageError("overwrite and resume exclude each other: pick one.")
    if cfg.simulate_k:  # NOT private: no ledger, journal, checkpoint or epsilon (dpmega.train.simulation)
      return simulation.run(self, resume=resume or resume_step is not None, overwrite=overwrite, stop=stop)
    if overwrite and jax.process_index() == 0:
      workdir_lib.discard_run(cfg.workdir, journal_name=journal_lib.FILENAME)
    os.makedirs(cfg.workdir, exist_ok=True)
    ckpt = checkpoint_lib.Checkpointer(os.path.join(cfg.workdir, "checkpoints"), max_to_keep=cfg.keep_checkpoints)
    try:
      return self._run(ckpt, resume=resume or resume_step is not None, resume_step=resume_step, stop=stop)
    finally:
      ckpt.close()

  def _run(self, ckpt: checkpoint_lib.Checkpointer, *, resume: bool, resume_step: int | None,
           stop: threading.Event | None) -> TrainResult:
    cfg, privacy = self.cfg, self.privacy
    main = jax.process_index() == 0  # with several processes, process 0 writes the files
    existing = ckpt.steps()
    if existing and not resume:
      raise UsageError(f"workdir {cfg.workdir!r} already holds checkpoints {existing}: pass --resume to "
                       "continue that run, --overwrite to start afresh, or choose another --workdir.")
    if resume and not existing:
      raise checkpoint_lib.CheckpointError(f"--resume: no checkpoint in {ckpt.directory}.")

    # --- plan: sigma and what the schedule will spend.
    self.stage.name = "calibrating sigma to the target epsilon" if cfg.noise_multiplier is None else "planning"
    sigma, how = privacy.choose_sigma()
    privacy.print_plan(sigma, how, self.out, randomness=self.randomness, mesh=self.mesh)
    note = optim.schedule_note(cfg.optimizer, self.full_batch_sizes[:cfg.num_steps])
    if note:
      self.out(f"plan: {note}")

    # --- restore or start. Every process reads the journal before process 0 appends to it, so all decide the
    # same generation; on resume every check runs before anything in the workdir is written.
    state = self.initial_state()
    ledger = accounting.Ledger()
    restored_at = None
    self.journal = journal_lib.Journal(cfg.workdir, writable=main)
    self.spent = self.journal.ledger()
    digest = identity.digest(self.fingerprint(sigma))
    latest = self.journal.latest_generation
    self.stage.name = "restoring the checkpoint" if resume else "starting the run"
    if resume:
      state, ledger = self._restore(ckpt, state, sigma, resume_step)
      restored_at = int(state.step)
      generation, reason = identity.resume_generation(self._resumed, latest, newest=existing[-1], digest=digest,
                                                      workdir=cfg.workdir, journal_path=self.journal.path)
      for path in ckpt.unfinished():
        self.out(f"ignoring an unfinished checkpoint save (interrupted): {path}")
      sharding.sync_processes("dpmega_journal_read")
      if reason is not None:
        self.journal.start_generation(generation, from_step=restored_at, from_generation=self._resumed["generation"],
                                      fingerprint=digest, reason=reason)
      self._set_randomness(self.secret, generation=generation)
      moved = ckpt.set_aside_after(restored_at) if main else []
      sharding.sync_processes("dpmega_set_aside")  # then every process sees the same checkpoints
      ckpt.steps()
      trajectory, total = privacy.epsilon(ledger), privacy.epsilon(self.spent)
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
        self.out(f"this workdir already spent epsilon {privacy.epsilon(self.spent):.4g} over "
                 f"{self.spent.num_steps} steps of an earlier run (its journal {self.journal.path}); they keep "
                 "counting (--overwrite discards them)")
    if self.config_dict is not None and main:
      record = json.loads(self.config_dict.to_json())
      record["randomness"] = self.randomness  # says whether the noise is secret; holds no key material
      with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
        f.write(json.dumps(record, indent=2))
    writer = (MetricsWriter(cfg.workdir, resume_step=restored_at, tensorboard=cfg.tensorboard) if main
              else NullWriter())
    if getattr(writer, "missing", None):
      self.out(f"warning: {writer.path} lacks the records of step(s) {writer.missing} (truncated or deleted): "
               "their metrics are lost; the checkpoint's ledger and the journal still account every step")

    # --- the loop.
    self.stage.name, self.stage.in_loop = "training", True  # from here SIGTERM stops between steps
    needs_checks = privacy.needs_checks(self.spent, ledger, sigma)
    epsilon = privacy.epsilon(self.spent)
    history, stop_reason, eval_metrics, last_iterate = [], None, {}, None
    calibration = before_calibration = None
    last_saved = restored_at
    try:
      while int(state.step) < cfg.num_steps:
        t = int(state.step)
        replay = (self.generation, t) in self.journal.steps()  # a bit-identical replay spends nothing new
        stop_reason = None if not needs_checks or replay else privacy.budget_stop(self.spent, t, sigma, epsilon)
        stop_reason = f"stopped by SIGTERM (preemption) after step {t}" if stop and stop.is_set() else stop_reason
        if stop_reason:
          self.out(stop_reason)
          break
        if not history:  # this process's first step traces and compiles it: said, timed apart
          self.out("compiling the step (first call) ...")
        start = time.perf_counter()
        with report.CompileClock() as compile_clock:
          state, metrics = self.train_step(state, sigma)
          jax.block_until_ready(state.params)
        seconds = time.perf_counter() - start - compile_clock.seconds
        if not history or compile_clock.seconds > 1:
          self.out(report.compile_line(compile_clock.seconds, first=not history))
        privacy.record(ledger, t, sigma)
        step = t + 1
        epsilon = privacy.epsilon(self.spent)
        record = {"step": step, "generation": self.generation, **metrics, "sigma": sigma, "epsilon": epsilon,
                  "delta": cfg.delta}
        if cfg.metrics is config_lib.MetricsMode.RAW:
          # Under Poisson sampling the step's time follows the realized batch size: raw mode only.
          record.update(seconds=seconds, compile_seconds=compile_clock.seconds,
                        examples_per_s=metrics["sampled"] / max(seconds, 1e-9))
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.num_steps:
          record.update({f"eval_{k}": v for k, v in self._evaluate(self.model_params(state)).items()})
        if record.get("selection_cap_hit") and not any(r.get("selection_cap_hit") for r in history):
          self.out(report.cap_warning(cfg, step))
        history.append(record)
        report.check_finite(metrics, step, last_saved)
        report.guarded(writer.write, record, what=writer.path, last_saved=last_saved)
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.num_steps):
          self.out(report.progress_line(cfg, record))
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.num_steps:
          report.guarded(self._save, ckpt, state, ledger, sigma, epsilon, what=f"the checkpoint of step {step}",
                         last_saved=last_saved)
          last_saved = step
      final_step = int(state.step)
      if last_saved != final_step:
        report.guarded(self._save, ckpt, state, ledger, sigma, epsilon, what=f"the checkpoint of step {final_step}",
                       last_saved=last_saved)
        last_saved = final_step
      model = self.model_params(state)
      if cfg.recalibration.steps and stop_reason is None and final_step == cfg.num_steps:
        # Private Platt scaling (dpmega.train.recalibration): more accounted steps, on the frozen model.
        self.stage.name = "recalibrating"
        before_calibration = self._evaluate(model)
        calibration, records, stop_reason = recalibration.run(self, model, sigma, ledger, first_step=cfg.num_steps,
                                                              out=self.out)
        for record in records:
          report.guarded(writer.write, record, what=writer.path, last_saved=last_saved)
        history += records
        epsilon = privacy.epsilon(self.spent)
      eval_metrics = self._evaluate(model, calibration)
      # With an average, the last iterate's evaluation too (summary.json, the closing lines): what it bought.
      last_iterate = self._evaluate(state.params) if model is not state.params else None
      report.guarded(writer.write, {"step": final_step, "final": True, "epsilon": epsilon, "delta": cfg.delta,
                                    **{f"eval_{k}": v for k, v in eval_metrics.items()}},
                     what=writer.path, last_saved=last_saved)
    except KeyboardInterrupt:
      raise report.Interrupted(report.resume_hint(last_saved)) from None
    finally:
      writer.close()

    # --- the summary.
    result = TrainResult(final_step, epsilon, cfg.delta, sigma, stop_reason, eval_metrics,
                         sharding.to_host(self.model_params(state)), ledger, history, privacy.epsilon(ledger),
                         self.spent, privacy.tail_delta(self.spent), self.generation, last_iterate, calibration,
                         before_calibration)
    if main:
      with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
        json.dump(report.summary(cfg, result, accounted_sigma=privacy.accounted(sigma), randomness=self.randomness,
                               sparse=None if self.sparse is None else self.sparse.settings(sigma),
                               num_noised_coordinates=privacy.tail.num_coordinates), f, indent=2)
    for line in report.closing_lines(cfg, result):
      self.out(line)
    return result


def train(config: ml_collections.ConfigDict, *, resume: bool = False, resume_step: int | None = None,
          overwrite: bool = False, out: Callable[[str], None] | None = None,
          stop: threading.Event | None = None, stage: report.Stage | None = None) -> TrainResult:
  """Validates ``config``, locks its workdir, builds its task and trains (see :class:`Trainer`).

  The workdir is checked and locked before the dataset is built (:mod:`dpmega.train.workdir`): a second run
  in the same workdir stops at once.

  Raises:
    UsageError: a bad config field (before any compute), an unusable or busy workdir, or a checkpoint
      problem on resume (:class:`dpmega.train.checkpoint.CheckpointError`).
  """
  cfg = config_lib.validate(config)
  sparse_tables.check(cfg.sparse, config.get("task"))  # the tables against the model's shapes, before the workdir
  with workdir_lib.locked(cfg.workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    stage = stage or report.Stage()
    stage.name = "building the dataset"
    try:
      task = build_task(config)
    except UsageError:
      raise
    except (ValueError, TypeError) as e:
      raise UsageError(f"task {cfg.task_name!r}: {e}") from None
    if cfg.epochs is not None:
      # The plan's length in passes over the data: the fewest steps whose expected batches add up to it.
      try:
        num_steps = schedules.steps_for_epochs(cfg.batch_schedule, cfg.epochs, len(task.train_source))
      except ValueError as e:
        raise UsageError(f"epochs: {e}") from None
      cfg = dataclasses.replace(cfg, num_steps=num_steps)
      (out or print)(f"plan: {cfg.epochs:g} epochs of N = {len(task.train_source):,} examples are {num_steps} "
                     "steps of the batch schedule (epochs replaces num_steps)")
    stage.name = "building the model"
    trainer = Trainer(cfg, task, out=out, config_dict=config)
    trainer.stage = stage
    return trainer.run(resume=resume, resume_step=resume_step, overwrite=overwrite, stop=stop)
