"""What a run tells its operator: the progress line, the compile time, ``summary.json``, the closing lines, and why it
stopped (also before the first step: :class:`Stage`).

Pure formatting and checks over the records the loop produces (:mod:`dpmega.train.loop`); nothing here
computes on private data. Failures the operator must act on -- a write that failed (disk full, permissions),
parameters that are no longer finite -- become one :class:`TrainingError` whose message says what to do next.

.. warning::
   With ``metrics="raw"`` the progress line shows statistics of the private batch without noise (training
   loss, realized batch size, clipped fraction): for the operator, not for release (:mod:`dpmega.train`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable

import jax

from dpmega import accounting
from dpmega.train import config as config_lib
from dpmega.train.privacy import fmt_int

PyTree = Any


class TrainingError(RuntimeError):
  """Training cannot go on (diverged, or the workdir cannot be written); the message says what to do."""


class Interrupted(KeyboardInterrupt):
  """Ctrl-C during the loop; the message says which step ``--resume`` continues from."""


class Stage:
  """Where a run is, for a signal that arrives before the loop (which stops cleanly between steps).

  The trainer sets ``name`` at each stage and ``in_loop`` once steps run; the CLI's SIGTERM handler reads them to
  stop at once before the loop, and the CLI names the stage in its one line (:func:`stopped_before_loop`).
  """

  def __init__(self, name: str = "reading the config"):
    self.name = name
    self.in_loop = False


class StoppedBeforeLoop(KeyboardInterrupt):
  """SIGTERM before the first step: raised from the signal handler, so calibration or dataset building end now."""


def stopped_before_loop(how: str, stage: Stage, workdir: str | None) -> str:
  """The one line for a stop before the loop: the stage, and what the workdir holds (no step ran: none spent).

  >>> stopped_before_loop("stopped by SIGTERM", Stage("calibrating the noise"), None)
  'stopped by SIGTERM while calibrating the noise, before the first step: no step ran and no privacy was spent; nothing was written to the workdir; run the same command again'
  """
  names = sorted(os.path.relpath(os.path.join(root, f), workdir) for root, _, files in os.walk(workdir or "")
                 for f in files if f != ".dpmega.lock") if workdir else []  # empty folders hold nothing
  held = (f"the workdir {workdir} holds {', '.join(names)} (the journal records no step)" if names
          else "nothing was written to the workdir")
  return (f"{how} while {stage.name}, before the first step: no step ran and no privacy was spent; {held}; run "
          "the same command again")


def resume_hint(last_saved: int | None) -> str:
  """Which step ``--resume`` continues from, given the newest checkpoint this run saved (or restored)."""
  if last_saved:
    return f"the last checkpoint is at step {last_saved}: run again with --resume, which continues from step {last_saved}"
  return "no checkpoint was written yet, so --resume has nothing to continue from: run again without --resume"


def error_reason(e: BaseException) -> str:
  """One whole line naming why a write failed: the OS error when there is one (Orbax wraps it in its text).

  >>> error_reason(OSError(28, "No space left on device", "/w/metrics.jsonl"))
  'No space left on device: /w/metrics.jsonl'
  >>> error_reason(ValueError("Failed writing: '/w/c/d/f1': Failed to write 8 bytes: [os_error_code='27']"))
  'File too large (errno 27) writing /w/c/d/f1'
  """
  if isinstance(e, OSError) and e.strerror:
    return e.strerror + (f": {e.filename}" if e.filename else "")
  text = " ".join(str(e).split())
  code = re.search(r"os_error_code='(\d+)'", text)
  if code:
    path = re.findall(r"Failed writing: [\"']([^\"']+)", text)
    return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})" + (f" writing {path[-1]}" if path else "")
  return text or type(e).__name__


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
    eval_metrics: the task's evaluation at the end (of the average of the parameters with ``optimizer.ema_decay``).
    params: the final parameters (host arrays): their average with ``optimizer.ema_decay``, else the last iterate.
    ledger: the ledger of the steps that led to the final model (its trajectory).
    history: the per-step records written to ``metrics.jsonl`` by this process.
    trajectory_epsilon: epsilon(delta) of ``ledger`` alone (<= ``epsilon``).
    spent: the workdir's ledger (what ``epsilon`` is computed from).
    delta_tail: the part of ``delta`` that the noise sampler's bounded support costs over ``spent``.
    generation: the generation the final steps ran in (0 unless a rewind or change started a new one).
    last_iterate_metrics: with ``optimizer.ema_decay``, the evaluation of the last iterate; else None.
    calibration: with ``recalibration.steps``, the private ``{"temperature": a, "bias": b}``: the model predicts
      ``sigmoid(a z + b)`` for its logit ``z`` (``eval_metrics`` are of these); else None.
    uncalibrated_metrics: with ``recalibration.steps``, the evaluation before the recalibration; else None.
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
  last_iterate_metrics: dict[str, float] | None = None
  calibration: dict[str, float] | None = None
  uncalibrated_metrics: dict[str, float] | None = None


class CompileClock:
  """Wall seconds JAX spends tracing, lowering and compiling inside a ``with`` block.

  The union of the time spans of JAX's own compile events (``jax.monitoring``: jaxpr tracing, lowering to MLIR,
  the XLA backend compile), so nested traces count once. The loop subtracts it from a step's time: examples/s
  measures the step, and the first call's compile is reported on its own line. Scoped: the listener is
  removed on exit.

  >>> import jax, jax.numpy as jnp
  >>> with CompileClock() as clock:
  ...   _ = jax.jit(lambda x: jnp.sin(x) * 2)(jnp.arange(3.0)).block_until_ready()
  >>> clock.seconds > 0
  True
  """

  EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.spans: list[tuple[float, float]] = []

  def _listen(self, event: str, start: float, end: float, **kwargs) -> None:
    del kwargs
    if event in self.EVENTS:
      self.spans.append((start, end))

  def __enter__(self) -> "CompileClock":
    jax.monitoring.register_event_time_span_listener(self._listen)
    return self

  def __exit__(self, *exc) -> None:
    jax.monitoring.unregister_event_time_span_listener(self._listen)

  @property
  def seconds(self) -> float:
    """The length of the union of the recorded spans."""
    total, reach = 0.0, -math.inf
    for start, end in sorted(self.spans):
      if end > reach:
        total += end - max(start, reach)
        reach = end
    return total


def compile_line(seconds: float, *, first: bool) -> str:
  """The line that reports a compile (the first call's, or a recompile for new shapes)."""
  what = "the step (first call)" if first else "the step again (new shapes)"
  return f"compiled {what} in {seconds:.1f} s (not counted in examples/s)"


def guarded(fn: Callable[..., Any], *args, what: str, last_saved: int | None) -> Any:
  """Runs a write; a failure (disk full, permissions, ...) becomes one clear :class:`TrainingError`."""
  try:
    return fn(*args)
  except Exception as e:  # noqa: BLE001 - Orbax and the OS raise many kinds; all mean the same here
    raise TrainingError(f"could not write {what} ({type(e).__name__}: {error_reason(e)}); free space or fix the "
                        f"cause; {resume_hint(last_saved)}.") from e


def check_finite(metrics: dict[str, Any], step: int, last_saved: int | None) -> None:
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


def progress_line(cfg: config_lib.TrainConfig, r: dict[str, Any]) -> str:
  """The one line a logged step prints (private quantities only under ``metrics="private"``)."""
  if cfg.metrics is config_lib.MetricsMode.PRIVATE:
    line = (f"step {r['step']}/{cfg.num_steps}  batch {fmt_int(r['batch_size'])} (expected)  noisy grad "
            f"norm {r['noisy_grad_norm']:.4g}  update norm {r['update_norm']:.4g}" +
            (f"  clipped ~{100 * r['private_clipped_fraction']:.0f}% (noisy)" if "private_clipped_fraction" in r
             else "") + f"  epsilon {r['epsilon']:.4g}")
  else:
    line = (f"step {r['step']}/{cfg.num_steps}  batch {fmt_int(r['batch_size'])} (drew "
            f"{fmt_int(r['sampled'])})  {r['examples_per_s']:,.0f} ex/s  loss {r['loss']:.4f}  "
            f"clipped {100 * r['clipped_fraction']:.0f}%  epsilon {r['epsilon']:.4g}")
  if "update_sparsity" in r:  # sparse tables: the release's selected rows (private)
    line += (f"  rows {fmt_int(r['selected_rows'])} (update sparsity {r['update_sparsity']:.3g}"
             + (", cap hit" if r.get("selection_cap_hit") else "") + ")")
  evals = {k[5:]: v for k, v in r.items() if k.startswith("eval_")}
  if evals:
    line += "  eval " + " ".join(f"{k} {v:.4f}" for k, v in evals.items())
  return line


def cap_warning(cfg: config_lib.TrainConfig, step: int) -> str:
  """Said once per run, at the first step whose selection ``sparse.max_rows`` bound (a released fact)."""
  return (f"warning: at step {step} a table selected more rows than sparse.max_rows={cfg.sparse.max_rows:,}: a uniform "
          "subset of them was updated and the rest dropped. Privacy is unchanged (post-processing of the released "
          "selection) but utility suffers (bench/RESULTS.md: -0.57 to -2.05 AUC points at eps 1 when the cap bound "
          "every step); raise sparse.max_rows above the rows a step selects (the progress line says 'cap hit', "
          "summary.json counts cap_hit_steps).")


def summary(cfg: config_lib.TrainConfig, result: TrainResult, *, accounted_sigma: float,
            randomness: str, sparse: dict[str, Any] | None = None,
            num_noised_coordinates: int | None = None) -> dict[str, Any]:
  """The record written to ``summary.json``: what ran, what it spent, how it ended (no key material).

  ``num_noised_coordinates``: what ``delta_tail`` was computed for (``dpmega epsilon --workdir`` reads it).
  ``sparse``: the sparse tables' settings (:meth:`dpmega.train.sparse_tables.SparseRun.settings`), recorded
  with the mean update sparsity and the number of steps whose selection the cap ``max_rows`` bound, over the
  steps this process ran (since the resume, on a resumed run).
  """
  if sparse is not None:
    sparsity = [r["update_sparsity"] for r in result.history if "update_sparsity" in r]
    sparse = {**sparse, "mean_update_sparsity": sum(sparsity) / len(sparsity) if sparsity else None,
              "cap_hit_steps": sum(1 for r in result.history if r.get("selection_cap_hit"))}
  return {
      "steps": result.steps, "num_steps": cfg.num_steps, "epsilon": result.epsilon, "delta": cfg.delta,
      "delta_tail": result.delta_tail, "noise_sampler": cfg.noise_sampler,
      "neighbouring_relation": cfg.sampling.relation_label, "sampling": cfg.sampling.value,
      "accountant": cfg.accountant, "noise_multiplier": result.noise_multiplier, "clip_norm": cfg.clip_norm,
      "accounted_noise_multiplier": accounted_sigma, "clipped_count_noise": cfg.clipped_count_noise,
      "metrics": cfg.metrics.value, "stop_reason": result.stop_reason, "eval": result.eval_metrics,
      "ema_decay": cfg.optimizer.ema_decay, "eval_last_iterate": result.last_iterate_metrics,
      "recalibration": None if result.calibration is None else {
          **result.calibration, "steps": cfg.recalibration.steps, "clip_norm": cfg.recalibration.clip_norm,
          "learning_rate": cfg.recalibration.learning_rate, "eval_before": result.uncalibrated_metrics},
      "generation": result.generation, "trajectory_epsilon": result.trajectory_epsilon,
      "ledger": result.ledger.to_dict(), "spent_steps": result.spent.num_steps,
      "spent_ledger": result.spent.to_dict(), "randomness": randomness,
      "num_noised_coordinates": num_noised_coordinates, "sparse": sparse,
  }


def closing_lines(cfg: config_lib.TrainConfig, result: TrainResult) -> list[str]:
  """The ``done:`` and ``eval:`` lines a finished run prints."""
  spent, ledger = result.spent, result.ledger
  extra = result.ledger.num_steps - result.steps if result.calibration is not None else 0
  done = (f"done: {result.steps} steps{f' + {extra} recalibration steps' if extra else ''}, " +
          accounting.describe(result.epsilon, cfg.delta, cfg.sampling, cfg.accountant) +
          (f"; delta_tail {result.delta_tail:.3g} included" if result.delta_tail > 1e-3 * cfg.delta else "") +
          (f"; spent by the workdir over {spent.num_steps} computed steps (this model's trajectory alone: "
           f"{result.trajectory_epsilon:.4g})" if spent.num_steps != ledger.num_steps else ""))
  average = result.last_iterate_metrics is not None
  lines = [done, f"eval{' (average of the parameters)' if average else ''}: " +
           ", ".join(f"{k} {v:.4f}" for k, v in result.eval_metrics.items())]
  if average:
    lines.append("eval (last iterate): " + ", ".join(f"{k} {v:.4f}" for k, v in result.last_iterate_metrics.items()))
  if result.calibration is not None:
    c, before = result.calibration, result.uncalibrated_metrics or {}
    ne = (f"; normalized entropy {before['normalized_entropy']:.4f} before, "
          f"{result.eval_metrics['normalized_entropy']:.4f} after" if "normalized_entropy" in before else "")
    lines.append(f"recalibration (private, accounted): predict sigmoid({c['temperature']:.4f} z {c['bias']:+.4f})"
                 f" for the model's logit z{ne}")
  ne = result.eval_metrics.get("normalized_entropy")
  if ne is not None and ne >= 1:
    lines.append(f"warning: normalized entropy {ne:.4f} >= 1: this model predicts worse than a constant predictor "
                 "of the positive rate; train longer, tune the learning rate or the clip norm, or lower the noise")
  return lines
