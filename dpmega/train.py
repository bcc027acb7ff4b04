"""The mega-batch DP-SGD loop: sample, stream, clip, noise once, update, account.

One logical step ``t`` (expected batch size ``B_t`` from the schedule):

1. the sampler draws the step's indices (Poisson with ``q_t = B_t / N``, or
   ``B_t`` without replacement);
2. the examples are read chunk by chunk (fixed shapes, padded and masked) and
   each chunk goes through the jitted clipped-sum accumulation -- the logical
   batch is never materialized on the device, only one chunk at a time;
3. ONE Gaussian draw from ``fold_in(fold_in(key(seed), NOISE), t)`` is added to
   the summed clipped gradients, which are divided by ``B_t`` (the expected batch
   size, never the realized one) and fed to the optax optimizer;
4. the ledger records ``(B_t, N, sigma, scheme)``.

Budget (``TrainConfig.noise_multiplier`` / ``target_epsilon``): with a target
only, sigma is calibrated for the whole configured schedule before step 1 and
the plan printed; with a fixed sigma, epsilon is reported as it goes; with
both, training stops before the step that would take epsilon past the target,
and says so. The ledger equals the ``(q_t, sigma_t)`` of the steps that ran,
also across ``resume``: the checkpoint holds it, and it is checked against the
schedule on restore.

The jitted pieces are pure functions -- ``accumulate(params, acc, batch, mask)
-> acc`` and ``apply_update(state, grad_sum, key, sigma, B) -> (state,
metrics)`` -- so that a mesh (data-parallel over a ``data`` axis) can be put
under them without changing the loop; noise keys depend only on ``(seed, t)``,
so a resumed run reuses no key for another step and redoes a replayed step
bit-for-bit.

.. warning::
   The per-step log lines (training loss, realized batch size, examples/s) are
   computed from the private batch WITHOUT noise: they are for the operator,
   not for release. Only the parameters (and what is computed from them, such
   as evaluation metrics on a separate split) carry the DP guarantee.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dpmega import accounting
from dpmega import checkpoint as checkpoint_lib
from dpmega import config as config_lib
from dpmega import sampling
from dpmega import sharding
from dpmega.clipping import ClipStats
from dpmega.clipping import clipped_grad_sum
from dpmega.errors import UsageError
from dpmega.noise import privatize
from dpmega.tasks import Task
from dpmega.tasks import build_task

PyTree = Any

# Independent streams derived from the run's root key jax.random.key(seed).
_INIT_STREAM = 0
_NOISE_STREAM = 1
_PREPARE_STREAM = 2


def noise_key(root_key: jax.Array, step: int) -> jax.Array:
  """The key of step ``step``'s noise: a pure function of (seed, step), used once."""
  return jax.random.fold_in(jax.random.fold_in(root_key, _NOISE_STREAM), step)


def key_fingerprint(key: jax.Array) -> str:
  """A short, printable identity of a key (for logs and tests of key reuse)."""
  return hashlib.sha256(np.asarray(jax.random.key_data(key)).tobytes()).hexdigest()[:16]


class TrainingError(RuntimeError):
  """Training cannot go on (diverged, or the workdir cannot be written); the message says what to do."""


class TrainState(NamedTuple):
  """The optimizer's view of a run: what the jitted update maps to itself."""

  step: jax.Array
  params: PyTree
  opt_state: PyTree


class Accumulator(NamedTuple):
  """Running float32 sum of clipped per-example gradients, and clipping stats."""

  grad_sum: PyTree
  stats: ClipStats


def make_learning_rate(cfg: config_lib.OptimizerConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup over ``warmup_steps``, then the optax decay named by ``cfg.schedule``."""
  lr = cfg.learning_rate
  decay_steps = max(num_steps - cfg.warmup_steps, 1)
  end = lr * cfg.final_lr_fraction
  kind = cfg.schedule
  if kind == config_lib.LrSchedule.CONSTANT:
    decay = optax.constant_schedule(lr)
  elif kind == config_lib.LrSchedule.COSINE:
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.final_lr_fraction)
  elif kind == config_lib.LrSchedule.LINEAR:
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    decay = optax.exponential_decay(lr, decay_steps, cfg.final_lr_fraction)
  if cfg.warmup_steps == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, cfg.warmup_steps), decay], [cfg.warmup_steps])


def make_optimizer(cfg: config_lib.OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
  """The optax optimizer of ``cfg`` (sgd, momentum, adam, adamw, lamb)."""
  lr = make_learning_rate(cfg, num_steps)
  name = cfg.name
  if name == config_lib.Optimizer.SGD:
    opt = optax.sgd(lr)
  elif name == config_lib.Optimizer.MOMENTUM:
    opt = optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
  elif name == config_lib.Optimizer.ADAM:
    return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  elif name == config_lib.Optimizer.ADAMW:
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  else:
    return optax.lamb(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  if cfg.weight_decay:
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
  return opt


def make_accumulate_fn(loss_fn: Callable[..., Any], *, clip_norm: float, microbatch_size: int,
                       has_aux: bool = False, clipping: str = "auto",
                       on_trace: Callable[[], None] | None = None):
  """Jitted ``(params, acc, batch, mask) -> acc``: adds a chunk's clipped, masked gradient sum.

  The chunk (``k * microbatch_size`` rows) is scanned micro-batch by
  micro-batch inside :func:`dpmega.clipping.clipped_grad_sum`; no noise here.
  ``on_trace`` is called each time JAX traces (compiles) a new shape.
  """

  def accumulate(params, acc: Accumulator, batch, mask) -> Accumulator:
    if on_trace is not None:
      on_trace()
    g, _, stats = clipped_grad_sum(loss_fn, params, batch, mask, clip_norm=clip_norm,
                                   microbatch_size=microbatch_size, has_aux=has_aux, clipping=clipping)
    return Accumulator(jax.tree_util.tree_map(jnp.add, acc.grad_sum, g), acc.stats.merge(stats))

  return jax.jit(accumulate)


def make_update_fn(optimizer: optax.GradientTransformation, *, clip_norm: float):
  """Jitted ``(state, grad_sum, key, noise_multiplier, expected_batch_size) -> (state, metrics)``.

  Adds the step's single noise draw to the whole logical batch's clipped sum,
  divides by the expected batch size, and applies the optimizer.
  """

  def apply_update(state: TrainState, grad_sum, key, noise_multiplier, expected_batch_size):
    noisy_mean = privatize(grad_sum, key, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                           expected_batch_size=expected_batch_size)
    updates, opt_state = optimizer.update(noisy_mean, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)]
    metrics = {"noisy_grad_norm": optax.tree.norm(noisy_mean), "update_norm": optax.tree.norm(updates),
               "params_finite": jnp.all(jnp.stack(finite)).astype(jnp.float32)}
    return TrainState(state.step + 1, params, opt_state), metrics

  return jax.jit(apply_update)


@dataclasses.dataclass
class TrainResult:
  """What a run ended with.

  Attributes:
    steps: logical steps completed (counting those before a resume).
    epsilon: epsilon(delta) of every step that ran (from the ledger).
    delta: the delta.
    noise_multiplier: sigma used at every step.
    stop_reason: why the run ended before ``num_steps`` (budget), else None.
    eval_metrics: the task's evaluation at the end.
    params: the final parameters (host arrays).
    ledger: the ledger of the steps that ran.
    history: the per-step records written to ``metrics.jsonl`` by this process.
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


def _fmt_int(n: int) -> str:
  return f"{int(n):,}"


class _MetricsWriter:
  """``metrics.jsonl`` (always) and TensorBoard (when ``tensorboardX`` is installed and enabled)."""

  def __init__(self, workdir: str, *, resume_step: int | None, tensorboard: bool):
    self.path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is None:
      open(self.path, "w").close()
    elif os.path.exists(self.path):
      # Drop what the interrupted process logged after its last checkpoint (those
      # steps are redone bit-for-bit and logged again), and a line torn by the kill.
      keep = []
      with open(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue
          if line.endswith("\n") and record.get("step", 0) <= resume_step and not record.get("final"):
            keep.append(line)
      with open(self.path, "w") as f:
        f.writelines(keep)
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - optional
      except ImportError:
        SummaryWriter = None  # pylint: disable=invalid-name
      if SummaryWriter is not None:
        # On resume, TensorBoard hides what the interrupted process logged after its
        # checkpoint (those steps are redone and logged again), as metrics.jsonl does.
        # Event files are named by the second they start in: a suffix keeps a quick
        # restart from truncating the interrupted process's file.
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=None if resume_step is None else resume_step + 1,
                                 filename_suffix=f".{time.time_ns()}.{os.getpid()}")

  def write(self, record: dict[str, Any]) -> None:
    """Appends one record, whole or not at all (a failed write is truncated away, then raised)."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      start = os.lseek(fd, 0, os.SEEK_END)
      try:
        done = 0
        while done < len(data):  # a short write (file size limit) fails on the next call
          done += os.write(fd, data[done:])
      except OSError:
        os.ftruncate(fd, start)
        raise
    finally:
      os.close(fd)
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
          self._tb.add_scalar(k, v, record["step"])
      self._tb.flush()  # a killed process must not lose steps that its checkpoint covers

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class _NullWriter:
  """What processes other than 0 log to: nothing (process 0 writes the run's files)."""

  path = None

  def write(self, record: dict[str, Any]) -> None:
    pass

  def close(self) -> None:
    pass


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
    self.root_key = jax.random.key(cfg.seed)
    self.optimizer = make_optimizer(cfg.optimizer, cfg.num_steps)
    self.num_traces = 0
    self.accumulate = make_accumulate_fn(
        task.loss_fn, clip_norm=cfg.clip_norm, microbatch_size=cfg.microbatch_size, has_aux=task.has_aux,
        clipping=cfg.clipping, on_trace=self._count_trace)
    self.apply_update = make_update_fn(self.optimizer, clip_norm=cfg.clip_norm)
    self.sampler = sampling.make_sampler(cfg.sampling, self.dataset_size, seed=cfg.seed)
    self.mesh = None
    if cfg.mesh is not None:
      self._init_mesh()
    elif jax.process_count() > 1:
      raise UsageError(f"{jax.process_count()} processes need a mesh: set mesh.enabled=True.")

  def _init_mesh(self) -> None:
    """Puts the step on a device mesh: batch over every device, params FSDP-sharded if asked."""
    cfg = self.cfg
    try:
      self.mesh = sharding.make_mesh(cfg.mesh)
    except ValueError as e:
      raise UsageError(f"mesh: {e}") from None
    shapes = jax.eval_shape(self.task.init_params, jax.random.fold_in(self.root_key, _INIT_STREAM))
    rule = dict(mesh=self.mesh, min_size=cfg.mesh.min_shard_size)
    self.param_shardings = sharding.param_shardings(shapes, **rule)
    self.opt_shardings = sharding.param_shardings(jax.eval_shape(self.optimizer.init, shapes), **rule)
    sharded = sharding.make_accumulate_fn(
        self.task.loss_fn, self.mesh, self.param_shardings, clip_norm=cfg.clip_norm,
        microbatch_size=cfg.microbatch_size, has_aux=self.task.has_aux, clipping=cfg.clipping, donate=False)

    def accumulate(params, acc: Accumulator, batch, mask) -> Accumulator:
      return Accumulator(*sharded(params, acc.grad_sum, acc.stats, batch, mask)[:2])

    self.accumulate = accumulate
    if jax.process_index() != 0:
      self.out = lambda s: None

  def _shard_state(self, state: TrainState) -> TrainState:
    if self.mesh is None:
      return state
    host = sharding.to_host(state)
    return TrainState(sharding.shard(host.step, sharding.replicated(self.mesh)),
                      sharding.shard(host.params, self.param_shardings),
                      sharding.shard(host.opt_state, self.opt_shardings))

  def _evaluate(self, params) -> dict[str, float]:
    # On a mesh, the task sees host arrays: params may be sharded across processes.
    return self.task.evaluate(params if self.mesh is None else sharding.to_host(params))

  def _count_trace(self) -> None:
    self.num_traces += 1

  # ------------------------------------------------------------------ setup
  def initial_state(self) -> TrainState:
    params = self.task.init_params(jax.random.fold_in(self.root_key, _INIT_STREAM))
    return self._shard_state(TrainState(jnp.zeros((), jnp.int32), params, self.optimizer.init(params)))

  def identity(self, noise_multiplier: float) -> dict[str, Any]:
    """The run-defining fields a checkpoint must share with the run resuming from it."""
    cfg = self.cfg
    return {
        "task": cfg.task_name, "dataset_size": self.dataset_size, "seed": cfg.seed,
        "sampling": cfg.sampling.value, "batch_schedule": cfg.batch_schedule.to_dict(),
        "num_steps": cfg.num_steps, "clip_norm": cfg.clip_norm, "noise_multiplier": noise_multiplier,
        "target_epsilon": cfg.target_epsilon, "delta": cfg.delta, "accountant": cfg.accountant,
        "optimizer": {k: (v.value if hasattr(v, "value") else v)
                      for k, v in dataclasses.asdict(cfg.optimizer).items()},
    }

  def _epsilon_of_prefix(self, num_steps: int, sigma: float) -> float:
    return accounting.epsilon_for_schedule(
        noise_multiplier=sigma, delta=self.cfg.delta, dataset_size=self.dataset_size,
        batch_sizes=self.batch_sizes[:num_steps], scheme=self.cfg.sampling, accountant=self.cfg.accountant)

  def plan(self) -> float:
    """Chooses sigma (fixed, or calibrated to the target for the whole schedule) and prints the plan."""
    cfg = self.cfg
    if cfg.noise_multiplier is not None:
      sigma, how = cfg.noise_multiplier, "fixed"
    else:
      sigma = accounting.calibrate_noise_multiplier(
          target_epsilon=cfg.target_epsilon, delta=cfg.delta, dataset_size=self.dataset_size,
          batch_sizes=self.batch_sizes, scheme=cfg.sampling, accountant=cfg.accountant)
      how = f"calibrated to epsilon <= {cfg.target_epsilon:g} for the whole schedule"
    n, sizes = self.dataset_size, self.batch_sizes
    self.out(f"plan: {cfg.num_steps} steps of batch schedule {cfg.batch_schedule.to_spec()} over "
             f"N = {_fmt_int(n)} examples (q from {sizes.min() / n:.4g} to {sizes.max() / n:.4g}), "
             f"{cfg.sampling.value.replace('_', ' ')} sampling, {cfg.accountant.upper()} accountant")
    self.out(f"plan: noise multiplier sigma = {sigma:.6g} ({how}), clip norm C = {cfg.clip_norm:g}, "
             f"micro-batch {cfg.microbatch_size} x {cfg.max_microbatches} per jitted call")
    points = sorted({max(1, round(cfg.num_steps * f)) for f in (0.1, 0.25, 0.5, 0.75, 1.0)})
    curve = [(p, self._epsilon_of_prefix(p, sigma)) for p in points]
    self.out("plan: expected epsilon after step " + ", ".join(f"{p}: {e:.4g}" for p, e in curve) +
             f" (delta = {cfg.delta:g}, {cfg.sampling.relation_label} neighbours)")
    if cfg.target_epsilon is not None and curve[-1][1] > cfg.target_epsilon:
      k = accounting.max_steps(
          target_epsilon=cfg.target_epsilon, delta=cfg.delta, dataset_size=n, batch_sizes=cfg.batch_schedule,
          noise_multiplier=sigma, scheme=cfg.sampling, accountant=cfg.accountant, limit=cfg.num_steps)
      self.out(f"plan: the budget epsilon = {cfg.target_epsilon:g} allows only {k} of the {cfg.num_steps} "
               f"steps; training will stop before step {k + 1}")
    return sigma

  def _expected_ledger(self, num_steps: int, sigma: float) -> accounting.Ledger:
    ledger = accounting.Ledger()
    for b in self.batch_sizes[:num_steps]:
      ledger.record(batch_size=int(b), dataset_size=self.dataset_size, noise_multiplier=sigma,
                    scheme=self.cfg.sampling)
    return ledger

  def _checkpoint_tree(self, state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": jax.random.key_data(self.root_key)}

  def _save(self, ckpt: checkpoint_lib.Checkpointer, state: TrainState, ledger: accounting.Ledger,
            sigma: float, epsilon: float) -> None:
    step = int(state.step)
    ckpt.save(step, sharding.to_host(self._checkpoint_tree(state)), {
        "ledger": ledger.to_dict(), "sampler": self.sampler.state.to_dict(), "identity": self.identity(sigma),
        "epsilon": epsilon,
    })

  def _restore(self, ckpt: checkpoint_lib.Checkpointer, template: TrainState, sigma: float,
               resume_step: int | None) -> tuple[TrainState, accounting.Ledger]:
    tree, meta = ckpt.restore(self._checkpoint_tree(template), step=resume_step)
    step = int(tree["step"])
    where = f"checkpoint at step {step} in {ckpt.directory}"
    mine, theirs = self.identity(sigma), meta.get("identity", {})
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
      detail = "; ".join(f"{k}: checkpoint {theirs.get(k)!r} vs now {mine.get(k)!r}" for k in diff)
      raise checkpoint_lib.CheckpointError(f"{where} is from another run configuration ({detail}).")
    if not np.array_equal(tree["rng"], np.asarray(jax.random.key_data(self.root_key))):
      raise checkpoint_lib.CheckpointError(f"{where} holds PRNG keys of another seed.")
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
    return self._shard_state(state), ledger

  # ------------------------------------------------------------------ steps
  def train_step(self, state: TrainState, sigma: float) -> tuple[TrainState, dict[str, Any]]:
    """One logical step at ``state.step``: sample, stream chunks, noise once, update."""
    cfg = self.cfg
    t = int(state.step)
    if self.sampler.position != t:
      raise RuntimeError(f"sampler position {self.sampler.position} != step {t}.")
    expected = int(self.batch_sizes[t])
    indices = self.sampler.sample(expected)
    chunk_args = dict(microbatch_size=cfg.microbatch_size, max_microbatches=cfg.max_microbatches)
    if self.mesh is None:
      grad_sum = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), state.params)
      chunks = sampling.iterate_chunks(self.task.train_source, indices, **chunk_args)
    else:
      # Every process drew the same global sample; each reads only its share.
      grad_sum = sharding.zeros_like_sharded(state.params, self.param_shardings)
      chunks = sharding.iterate_process_chunks(self.task.train_source, indices, self.mesh, **chunk_args)
    acc = Accumulator(grad_sum, ClipStats.zeros())
    prepare_key = jax.random.fold_in(jax.random.fold_in(self.root_key, _PREPARE_STREAM), t)
    for i, chunk in enumerate(chunks):
      batch, mask = chunk.batch, chunk.mask
      if self.task.prepare_batch is not None:
        batch = self.task.prepare_batch(batch, jax.random.fold_in(prepare_key, i * jax.process_count() +
                                                                  jax.process_index()))
      if self.mesh is not None:
        batch, mask = sharding.global_batch_from_process_local((batch, mask), self.mesh)
      previous, acc = acc, self.accumulate(state.params, acc, batch, mask)
      # At most one chunk in flight while the host reads the next: memory stays
      # bounded by the chunk size whatever the logical batch size.
      jax.block_until_ready(previous)
    key = noise_key(self.root_key, t)
    state, update_metrics = self.apply_update(state, acc.grad_sum, key, np.float32(sigma), np.float32(expected))
    stats = jax.device_get(acc.stats)
    n = int(stats.num_examples)
    metrics = {
        "batch_size": expected, "sampled": len(indices), "q": expected / self.dataset_size,
        "loss": float(stats.loss_sum) / max(n, 1), "clipped_fraction": int(stats.num_clipped) / max(n, 1),
        "nonfinite": int(stats.num_nonfinite), "mean_grad_norm": float(stats.norm_sum) / max(n, 1),
        "noise_key": key_fingerprint(key),
    }
    metrics.update({k: float(v) for k, v in jax.device_get(update_metrics).items()})
    return state, metrics

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
    if resume:
      for path in ckpt.unfinished():
        self.out(f"ignoring an unfinished checkpoint save (interrupted): {path}")
      state, ledger = self._restore(ckpt, state, sigma, resume_step)
      restored_at = int(state.step)
      moved = ckpt.set_aside_after(restored_at) if main else []
      sharding.sync_processes("dpmega_set_aside")  # then every process sees the same checkpoints
      ckpt.steps()
      self.out(f"resumed from the checkpoint at step {restored_at} (epsilon so far "
               f"{accounting.compute_epsilon(ledger, cfg.delta, cfg.accountant):.4g})" +
               (f"; newer checkpoints set aside in {os.path.dirname(moved[0])}" if moved else ""))
    if self.config_dict is not None and main:
      with open(os.path.join(cfg.workdir, "config.json"), "w") as f:
        f.write(self.config_dict.to_json(indent=2))
    writer = (_MetricsWriter(cfg.workdir, resume_step=restored_at, tensorboard=cfg.tensorboard) if main
              else _NullWriter())
    # Every prefix of the schedule costs at most the whole schedule (epsilon is
    # monotone in steps), so per-step budget checks are needed only when the
    # whole schedule does not fit.
    needs_checks = cfg.target_epsilon is not None and \
        self._epsilon_of_prefix(cfg.num_steps, sigma) > cfg.target_epsilon
    epsilon = accounting.compute_epsilon(ledger, cfg.delta, cfg.accountant)
    history, stop_reason, eval_metrics = [], None, {}
    last_saved = restored_at
    try:
      while int(state.step) < cfg.num_steps:
        t = int(state.step)
        expected = int(self.batch_sizes[t])
        if needs_checks and not accounting.fits_budget(
            ledger, next_batch_size=expected, dataset_size=self.dataset_size, noise_multiplier=sigma,
            scheme=cfg.sampling, target_epsilon=cfg.target_epsilon, delta=cfg.delta, accountant=cfg.accountant):
          trial = ledger.copy()
          trial.record(batch_size=expected, dataset_size=self.dataset_size, noise_multiplier=sigma,
                       scheme=cfg.sampling)
          stop_reason = (f"privacy budget: stopped before step {t + 1} of {cfg.num_steps}, which would take "
                         f"epsilon from {epsilon:.4g} to "
                         f"{accounting.compute_epsilon(trial, cfg.delta, cfg.accountant):.4g} > target "
                         f"{cfg.target_epsilon:g} (delta = {cfg.delta:g})")
          self.out(stop_reason)
          break
        start = time.perf_counter()
        state, metrics = self.train_step(state, sigma)
        jax.block_until_ready(state.params)
        seconds = time.perf_counter() - start
        ledger.record(batch_size=expected, dataset_size=self.dataset_size, noise_multiplier=sigma,
                      scheme=cfg.sampling)
        step = t + 1
        epsilon = accounting.compute_epsilon(ledger, cfg.delta, cfg.accountant)
        record = {"step": step, **metrics, "sigma": sigma, "epsilon": epsilon, "delta": cfg.delta,
                  "seconds": seconds, "examples_per_s": metrics["sampled"] / max(seconds, 1e-9)}
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
    summary = {
        "steps": final_step, "num_steps": cfg.num_steps, "epsilon": epsilon, "delta": cfg.delta,
        "neighbouring_relation": cfg.sampling.relation_label, "sampling": cfg.sampling.value,
        "accountant": cfg.accountant, "noise_multiplier": sigma, "clip_norm": cfg.clip_norm,
        "stop_reason": stop_reason, "eval": eval_metrics, "ledger": ledger.to_dict(),
    }
    if main:
      with open(os.path.join(cfg.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    self.out(f"done: {final_step} steps, " + accounting.describe(epsilon, cfg.delta, cfg.sampling, cfg.accountant))
    self.out("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    return TrainResult(final_step, epsilon, cfg.delta, sigma, stop_reason, eval_metrics,
                       sharding.to_host(state.params), ledger, history)

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
    """Stops a diverged run before it is logged or checkpointed, keeping the last good checkpoint."""
    all_bad = metrics["sampled"] > 0 and metrics["nonfinite"] == metrics["sampled"]
    params_ok = metrics["params_finite"] == 1.0
    if params_ok and not all_bad:
      return
    what = ("the parameters are not finite (nan or inf)" if not params_ok else
            f"every sampled example had a non-finite loss gradient (loss {metrics['loss']})")
    keep = (f"the last good checkpoint is at step {last_saved}" if last_saved else "no checkpoint was written")
    raise TrainingError(f"training diverged at step {step}: {what}; nothing of this step was saved and {keep}. "
                        "Lower the learning rate (or check the data) and start again.")

  def _progress_line(self, r: dict[str, Any]) -> str:
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
      problem on resume (:class:`dpmega.checkpoint.CheckpointError`).
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
