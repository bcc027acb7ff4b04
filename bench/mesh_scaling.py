"""Examples/s of one private step on 1, 2, 4 and 8 devices (the trainer's step: dpmega.train.step).

  python bench/mesh_scaling.py                      # CPU: 8 simulated devices
  python bench/mesh_scaling.py --devices 1 --platform gpu   # one GPU

One logical step = ``rows`` examples through the trainer's sharded step
(:func:`dpmega.train.step.make_private_step`): its ``accumulate`` (per-example
clipping of an MLP, ``microbatch`` rows per scan step per device) and its
``update`` (the single noise draw, then SGD). The batch is split over a
``data`` mesh of the first n devices; the figure is the median over ``reps``
timed steps after a compile-and-warm-up step.

.. note::
   On the CPU, the simulated devices
   (``--xla_force_host_platform_device_count``) share the machine's cores (two
   on the development machine), so more devices cannot be faster there: the
   CPU figures measure the overhead of sharding and collectives, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
  parser.add_argument("--platform", default="cpu", choices=["cpu", "gpu", "tpu"])
  parser.add_argument("--rows", type=int, default=1024, help="examples per logical step")
  parser.add_argument("--microbatch", type=int, default=32, help="rows per scan step per device")
  parser.add_argument("--fsdp", type=int, default=1, help="size of the parameter-sharding axis")
  parser.add_argument("--hidden", type=int, default=512)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args(argv)
  counts = [int(c) for c in args.devices.split(",")]

  if args.platform == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
    flag = f"--xla_force_host_platform_device_count={max(counts)}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  from dpmega import noise
  from dpmega import sharding
  from dpmega.train import step as step_lib

  secret = noise.secret_bytes()
  d_in, d_out = 256, 10
  rng = np.random.default_rng(0)
  params = {
      "w1": (rng.normal(size=(d_in, args.hidden)) / np.sqrt(d_in)).astype(np.float32),
      "b1": np.zeros((args.hidden,), np.float32),
      "w2": (rng.normal(size=(args.hidden, d_out)) / np.sqrt(args.hidden)).astype(np.float32),
  }
  batch = {"x": rng.normal(size=(args.rows, d_in)).astype(np.float32),
           "y": rng.integers(0, d_out, size=(args.rows,)).astype(np.int32)}
  mask = np.ones((args.rows,), np.float32)

  def loss_fn(p, ex):
    h = jnp.tanh(ex["x"] @ p["w1"] + p["b1"])
    return -jax.nn.log_softmax(h @ p["w2"])[ex["y"]]

  devices = jax.devices()
  print(f"jax {jax.__version__}, platform {devices[0].platform} ({devices[0].device_kind}), "
        f"{len(devices)} devices, {os.cpu_count()} host cores; MLP {d_in}-{args.hidden}-{d_out}, "
        f"{args.rows} examples per step, micro-batch {args.microbatch} per device, fsdp {args.fsdp}")
  if args.platform == "cpu":
    print(f"note: the {len(devices)} CPU devices are simulated and share {os.cpu_count()} cores: "
          "no speed-up is possible, this measures the cost of sharding")
  base = None
  for n in counts:
    if n > len(devices):
      print(f"{n} devices: skipped (only {len(devices)})")
      continue
    mesh = sharding.make_mesh(sharding.MeshConfig(data=n // args.fsdp, fsdp=args.fsdp), devices[:n])
    opt = optax.sgd(1e-3)
    private_step = step_lib.make_private_step(loss_fn, opt, mesh, params, clip_norm=1.0,
                                              microbatch_size=args.microbatch, max_microbatches=1, min_shard_size=0)
    state = private_step.shard_state(step_lib.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params)))
    b = sharding.global_batch_from_process_local(batch, mesh)
    m = sharding.global_batch_from_process_local(mask, mesh)

    def step(t):
      acc = private_step.accumulate(state.params, private_step.zero_accumulator(params), b, m)
      out = private_step.update(state, acc.grad_sum, noise.step_key(secret, t), 1.0, float(args.rows))
      jax.block_until_ready(out)

    step(0)
    times = []
    for t in range(args.reps):
      start = time.perf_counter()
      step(t + 1)
      times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    rate = args.rows / sec
    base = base or rate
    print(f"{n} device(s) (data {n // args.fsdp} x fsdp {args.fsdp}): {rate:10.1f} examples/s "
          f"({1000 * sec:.1f} ms/step, {rate / base:.2f}x the first row)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
