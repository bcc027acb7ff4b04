"""Utility of private tiny-BERT pretraining on the CPU corpus (stdlib docstrings).

Two sweeps, every arm on the same data, model, optimizer and number of
processed examples (``--examples``, the compute budget):

1. privacy: non-private vs DP at epsilon in {2, 5.36, 8}, batch 512;
2. batch size at fixed epsilon 5.36 and fixed compute: batch B for
   ``examples / B`` steps, B in {256, 512, 1024, 2048} -- the trend of
   Anil et al. 2021 (arXiv 2108.01624) that bigger batches help DP-SGD;
3. (``--sweep steps``) batch size at fixed epsilon 5.36 and a fixed number of
   steps, so compute grows with B.

DP arms run through ``dpmega.train.train`` (Poisson sampling, sigma calibrated
for the whole run, clipping "auto", noise once per step); the non-private arm
is a plain Adam loop on the mean loss (no clipping, no noise) over batches of
the same size drawn uniformly, with the same masking.

  python bench/bert_utility.py                 # both sweeps: 7 runs, ~8 CPU-minutes
  python bench/bert_utility.py --sweep privacy --examples 16384   # quicker

Prints a Markdown table (MLM accuracy on the held-out modules, unigram
baseline, sigma, epsilon, seconds) and writes it as JSON next to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpmega.train import config as config_lib  # noqa: E402
from dpmega import tasks  # noqa: E402
from dpmega import train as train_lib  # noqa: E402


def base_config(args) -> object:
  config = config_lib.load_config(str(ROOT / "configs" / "bert_tiny_mlm.py"))
  config.task.cache_dir = args.cache_dir
  config.optimizer.learning_rate = args.learning_rate
  config.log_every = 0
  config.eval_every = 0
  config.checkpoint_every = 0
  config.tensorboard = False
  config.init_seed = args.seed  # public, init only: the DP runs key noise and sampling by a fresh secret
  return config


def run_dp(args, batch: int, epsilon: float, steps: int | None = None) -> dict:
  config = base_config(args)
  steps = steps or max(1, args.examples // batch)
  config.num_steps = steps
  config.batch_schedule = f"constant:{batch}"
  config.microbatch_size = min(batch, 128)
  config.max_microbatches = max(1, min(8, batch // 128))
  config.target_epsilon = epsilon
  config.noise_multiplier = None
  with tempfile.TemporaryDirectory() as workdir:
    config.workdir = workdir
    start = time.perf_counter()
    result = train_lib.train(config, out=lambda line: None)
    seconds = time.perf_counter() - start
  return {"arm": f"DP eps={epsilon:g}", "batch": batch, "steps": steps, "sigma": result.noise_multiplier,
          "epsilon": result.epsilon, "delta": result.delta, "seconds": seconds, **result.eval_metrics}


def run_non_private(args, batch: int) -> dict:
  config = base_config(args)
  steps = max(1, args.examples // batch)
  config.num_steps = steps
  config.noise_multiplier = 1.0  # unused: only to pass validation of the shared config
  task = tasks.build_task(config)
  optimizer = optax.adam(args.learning_rate)
  params = task.init_params(jax.random.fold_in(jax.random.key(args.seed), 0))  # the trainer's init for init_seed = seed
  opt_state = optimizer.init(params)

  def mean_loss(p, b):
    losses, _ = jax.vmap(task.loss_fn, in_axes=(None, 0))(p, b)
    return jnp.mean(losses)

  @jax.jit
  def step(p, s, b):
    g = jax.grad(mean_loss)(p, b)
    updates, s = optimizer.update(g, s, p)
    return optax.apply_updates(p, updates), s

  rng = np.random.default_rng(args.seed)
  n = len(task.train_source)
  start = time.perf_counter()
  for t in range(steps):
    rows = task.train_source.take(rng.integers(0, n, batch))
    b = task.prepare_batch(rows, jax.random.fold_in(jax.random.key(args.seed + 1), t))
    params, opt_state = step(params, opt_state, b)
  jax.block_until_ready(params)
  seconds = time.perf_counter() - start
  return {"arm": "non-private", "batch": batch, "steps": steps, "sigma": 0.0, "epsilon": float("inf"),
          "delta": 0.0, "seconds": seconds, **task.evaluate(params)}


def table(rows: list[dict]) -> str:
  lines = ["| arm | batch | steps | sigma | epsilon (delta) | MLM acc | unigram | eval loss | seconds |",
           "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
  for r in rows:
    eps = "inf" if r["epsilon"] == float("inf") else f"{r['epsilon']:.3g} ({r['delta']:g})"
    lines.append(f"| {r['arm']} | {r['batch']} | {r['steps']} | {r['sigma']:.3g} | {eps} | "
                 f"{r['mlm_accuracy']:.4f} | {r['unigram_accuracy']:.4f} | {r['mlm_loss']:.3f} | {r['seconds']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep", choices=("privacy", "batch", "both", "steps"), default="both",
                      help="steps: the batch sweep at a fixed number of steps (--steps), compute growing with B")
  parser.add_argument("--steps", type=int, default=32, help="steps of every arm of --sweep steps")
  parser.add_argument("--examples", type=int, default=32_768, help="examples processed per arm (compute budget)")
  parser.add_argument("--batches", default="256,512,1024,2048", help="batch sizes of the batch sweep")
  parser.add_argument("--learning_rate", type=float, default=1e-2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cache_dir", default=os.environ.get("DPMEGA_CACHE_DIR", ""))
  parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bert_utility.json"))
  args = parser.parse_args(argv)
  rows = []
  done = {}

  def record(row):
    rows.append(row)
    print(json.dumps(row), flush=True)

  if args.sweep in ("privacy", "both"):
    record(run_non_private(args, 512))
    for eps in (2.0, 5.36, 8.0):
      done[(512, eps)] = run_dp(args, 512, eps)
      record(done[(512, eps)])
  if args.sweep in ("batch", "both"):
    for batch in map(int, args.batches.split(",")):
      row = done.get((batch, 5.36)) or run_dp(args, batch, 5.36)
      if (batch, 5.36) not in done:
        record(row)
  if args.sweep == "steps":
    for batch in map(int, args.batches.split(",")):
      record(run_dp(args, batch, 5.36, steps=args.steps))
  print(table(rows))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"args": vars(args), "device": str(jax.devices()[0]), "rows": rows}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
