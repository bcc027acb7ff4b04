"""Mesh and multi-process checks that need their own JAX process (spawned by the tests).

``python tests/mesh_worker.py devices8 OUT`` -- run with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``: trains the same short
private loop on 1 device and on several 8-device meshes, probes clipping per
shard and the noise, and writes ``OUT/devices8.npz`` + ``OUT/devices8.json``.

``python tests/mesh_worker.py multihost OUT --process_id I --num_processes 2
--port P`` -- one of the processes of a ``jax.distributed`` CPU run (gloo,
loopback only): trains the loop on a mesh spanning every process, saves and
restores an Orbax checkpoint from all processes, checks that a secret drawn
on process 0 reaches every process (``sharding.broadcast_secret``), and (process 0) writes
``OUT/multihost.npz`` + ``OUT/multihost.json``.

The loop itself (:func:`train`) is imported by the tests to compute the
single-process reference in their own process. Every check runs the trainer's
own step (:func:`dpmega.train.step.make_private_step`): its chunker, sharded
clipped sum and update with the one noise draw.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

# A fixed, PUBLIC seed so that 1 device, 8 devices and 2 processes can be compared bit for bit: test-only
# (a real run draws its secret from the OS CSPRNG).
SEED = 7
DATASET_SIZE = 384
BATCH_SIZE = 64          # expected batch size B (q = 1/6)
NOISE_MULTIPLIER = 1.0
CLIP_NORM = 0.5
MICROBATCH = 2           # per device
MAX_MICROBATCHES = 4
STEPS = 3
D_IN, D_HID, D_OUT = 8, 32, 4


def dataset():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(DATASET_SIZE, D_IN)).astype(np.float32)
  y = rng.integers(0, D_OUT, size=(DATASET_SIZE,)).astype(np.int32)
  return x, y


def init_params():
  rng = np.random.default_rng(1)
  return {
      "w1": (rng.normal(size=(D_IN, D_HID)) / np.sqrt(D_IN)).astype(np.float32),
      "b1": np.zeros((D_HID,), np.float32),
      "w2": (rng.normal(size=(D_HID, D_OUT)) / np.sqrt(D_HID)).astype(np.float32),
  }


def loss_fn(params, example):
  import jax
  import jax.numpy as jnp
  h = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
  logits = h @ params["w2"]
  return -jax.nn.log_softmax(logits)[example["y"]]


def fixed_secret():
  from dpmega import noise
  return noise.insecure_secret_from_seed(SEED)


def make_step(mesh, optimizer, params, *, loss=None, min_shard_size=0):
  """The trainer's step functions (:func:`dpmega.train.step.make_private_step`) for this file's model."""
  from dpmega.train import step as step_lib
  return step_lib.make_private_step(loss or loss_fn, optimizer, mesh, params, clip_norm=CLIP_NORM,
                                    microbatch_size=MICROBATCH, max_microbatches=MAX_MICROBATCHES,
                                    min_shard_size=min_shard_size)


def initial_state(private_step, params, optimizer):
  import jax.numpy as jnp

  from dpmega.train import step as step_lib
  return private_step.shard_state(step_lib.TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params)))


def train(mesh, *, steps=STEPS, min_shard_size=0, noise_multiplier=NOISE_MULTIPLIER, secret=None):
  """The short private loop on ``mesh``; returns (params, opt_state, per-step example counts) as global arrays.

  Poisson sample of the whole logical batch -> this process's share in fixed
  chunks -> sharded clipped sums -> noise once -> adam, all by the trainer's step.
  """
  import optax

  from dpmega import noise
  from dpmega import sampling
  from dpmega.data.sources import ArraySource

  secret = fixed_secret() if secret is None else secret
  x, y = dataset()
  opt = optax.adam(1e-2)
  params0 = init_params()
  private_step = make_step(mesh, opt, params0, min_shard_size=min_shard_size)
  state = initial_state(private_step, params0, opt)
  source = ArraySource({"x": x, "y": y})
  sampler = sampling.PoissonSampler(DATASET_SIZE, secret=secret)
  counts = []
  for step in range(steps):
    # Every process draws the same global sample, then reads only its share.
    acc = private_step.clipped_sum(state.params, private_step.chunks(source, sampler.indices_at(step, BATCH_SIZE)))
    counts.append(int(acc.stats.num_examples))
    state, _ = private_step.update(state, acc.grad_sum, noise.step_key(secret, step), noise_multiplier, BATCH_SIZE,
                                   acc.stats.num_clipped)
  return state.params, state.opt_state, counts


def _spec_strings(tree):
  import jax
  return [str(x.sharding.spec) for x in jax.tree_util.tree_leaves(tree)]


def devices8(out_dir):
  import jax
  import jax.numpy as jnp
  import optax

  from dpmega import clipping
  from dpmega import noise
  from dpmega import sharding

  assert jax.device_count() == 8, jax.devices()
  sharding.check_partitionable_rng()
  arrays, info = {}, {"threefry_partitionable": bool(jax.config.jax_threefry_partitionable)}

  # 1. The same loop on 1 device and on 8 devices (pure data parallel and FSDP).
  meshes = {
      "d1": sharding.MeshConfig(data=1),
      "d8": sharding.MeshConfig(),
      "d2f4": sharding.MeshConfig(fsdp=4),
  }
  info["sample_counts"] = {}
  for name, cfg in meshes.items():
    mesh = sharding.make_mesh(cfg)
    params, opt_state, counts = train(mesh)
    info["sample_counts"][name] = counts
    for k, v in params.items():
      arrays[f"{name}/{k}"] = np.asarray(v)
    info[f"{name}/mesh"] = dict(mesh.shape)
    info[f"{name}/param_specs"] = {k: str(v.sharding.spec) for k, v in params.items()}
    info[f"{name}/param_shard_shapes"] = {k: list(v.addressable_shards[0].data.shape) for k, v in params.items()}
    info[f"{name}/opt_specs"] = _spec_strings(opt_state)
    info[f"{name}/opt_shard_shapes"] = [list(l.addressable_shards[0].data.shape)
                                        for l in jax.tree_util.tree_leaves(opt_state)]

  # 2. Per-example clipping on every shard: one huge example per device at a time.
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2))
  params0 = init_params()
  private_step = make_step(mesh, optax.sgd(1.0), params0)
  params = sharding.shard(params0, private_step.param_shardings)
  accumulate = private_step.accumulate
  rows = 8 * MICROBATCH * 2
  rng = np.random.default_rng(5)
  big = {"x": (1e3 * rng.normal(size=(rows, D_IN))).astype(np.float32),
         "y": rng.integers(0, D_OUT, size=(rows,)).astype(np.int32)}
  per_device = rows // 8
  norms = []
  for d in range(8):
    mask = np.zeros((rows,), np.float32)
    mask[d * per_device + (d % per_device)] = 1.0
    g, st = accumulate(params, private_step.zero_accumulator(params0),
                       sharding.global_batch_from_process_local(big, mesh),
                       sharding.global_batch_from_process_local(mask, mesh))
    norms.append(float(jnp.sqrt(sum(jnp.sum(v ** 2) for v in jax.tree_util.tree_leaves(g)))))
    info.setdefault("clip_counts", []).append([int(st.num_examples), int(st.num_clipped)])
  info["single_example_norms"] = norms
  # Whole chunk (half masked) vs the one-device clipped sum.
  mask = (rng.random(rows) < 0.5).astype(np.float32)
  small = {"x": big["x"] / 1e3, "y": big["y"]}
  g, st = accumulate(params, private_step.zero_accumulator(params0),
                     sharding.global_batch_from_process_local(small, mesh),
                     sharding.global_batch_from_process_local(mask, mesh))
  ref, _, ref_st = clipping.clipped_grad_sum(loss_fn, params0, small, mask, clip_norm=CLIP_NORM)
  for k in params0:
    arrays[f"chunk_sharded/{k}"] = np.asarray(g[k])
    arrays[f"chunk_single/{k}"] = np.asarray(ref[k])
  info["chunk_stats"] = {"sharded": [float(v) for v in st], "single": [float(v) for v in ref_st]}
  info["chunk_grad_specs"] = {k: str(v.sharding.spec) for k, v in g.items()}

  # 3. Noise: one draw per step, not per device, the same on 1 and 8 devices. Read off the trainer's update
  # with sgd(1) from zero parameters and a zero gradient sum: the new parameters are minus the noisy mean.
  n = 2**16
  big_params = {"w": np.zeros((n // 64, 64), np.float32), "v": np.zeros((64,), np.float32)}
  noise_loss = lambda p, ex: 0.0 * (jnp.sum(p["w"]) + jnp.sum(p["v"])) * ex["x"][0]
  zero_batch = {"x": np.ones((8 * MICROBATCH, 1), np.float32)}
  sigma, expected = 2.0, 100.0
  draws = {}
  for name, cfg in {"d1": sharding.MeshConfig(data=1), "d8": sharding.MeshConfig(),
                    "d1f8": sharding.MeshConfig(fsdp=8)}.items():
    mesh = sharding.make_mesh(cfg)
    opt = optax.sgd(1.0)
    private_step = make_step(mesh, opt, big_params, loss=noise_loss)
    state = initial_state(private_step, big_params, opt)
    acc = private_step.accumulate(state.params, private_step.zero_accumulator(big_params),
                                  sharding.global_batch_from_process_local(zero_batch, mesh),
                                  sharding.global_batch_from_process_local(np.ones((8 * MICROBATCH,), np.float32),
                                                                           mesh))
    state, _ = private_step.update(state, acc.grad_sum, noise.step_key(fixed_secret(), 0), sigma, expected)
    noisy = jax.tree_util.tree_map(lambda p: -p, state.params)
    draws[name] = noisy
    arrays[f"noise_{name}/w"] = np.asarray(noisy["w"])
    arrays[f"noise_{name}/v"] = np.asarray(noisy["v"])
    info[f"noise_{name}/w_spec"] = str(noisy["w"].sharding.spec)
    info[f"noise_{name}/w_shards"] = [np.asarray(s.data).ravel()[:16].tolist() for s in noisy["w"].addressable_shards]
  info["noise_expected_std"] = sigma * CLIP_NORM / expected
  np.savez(os.path.join(out_dir, "devices8.npz"), **arrays)
  with open(os.path.join(out_dir, "devices8.json"), "w") as f:
    json.dump(info, f)


def multihost(out_dir, process_id, num_processes, port):
  from dpmega import sharding
  sharding.initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id, initialization_timeout=60)

  import jax
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils

  assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes
  try:
    sharding.make_mesh(sharding.MeshConfig(data=1))
    partial_mesh_error = ""
  except ValueError as e:
    partial_mesh_error = str(e)
  mesh = sharding.make_mesh(sharding.MeshConfig(fsdp=2))
  params, opt_state, counts = train(mesh)
  info = {"mesh": dict(mesh.shape), "process_count": jax.process_count(), "counts": counts,
          "param_specs": {k: str(v.sharding.spec) for k, v in params.items()},
          "fully_addressable": all(v.is_fully_addressable for v in params.values()),
          "partial_mesh_error": partial_mesh_error}

  # Checkpoint written by every process, restored onto the same shardings.
  ckpt_dir = os.path.join(out_dir, "ckpt")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(ckpt_dir, {"params": params, "opt_state": opt_state})
    ckptr.wait_until_finished()
    target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                    {"params": params, "opt_state": opt_state})
    restored = ckptr.restore(ckpt_dir, target)
  same = jax.tree_util.tree_map(np.array_equal, sharding.to_host({"params": params, "opt_state": opt_state}),
                                sharding.to_host(restored))
  info["checkpoint_roundtrip_equal"] = all(jax.tree_util.tree_leaves(same))
  info["restored_specs"] = {k: str(v.sharding.spec) for k, v in restored["params"].items()}

  # A fresh secret on each process; after the broadcast, every process holds process 0's. Only
  # booleans leave the processes: the secrets themselves are never written or printed.
  from dpmega import noise
  drawn = noise.secret_bytes()
  shared = sharding.broadcast_secret(drawn)
  words = lambda b: np.frombuffer(b, np.uint32)
  all_drawn = np.asarray(multihost_utils.process_allgather(words(drawn)))
  all_shared = np.asarray(multihost_utils.process_allgather(words(shared)))
  info["secret_draws_differ"] = bool(len({row.tobytes() for row in all_drawn}) == num_processes)
  info["secret_shared_by_all"] = bool((all_shared == all_shared[0]).all())
  info["secret_is_process0s"] = bool(np.array_equal(all_shared[0], all_drawn[0]))
  gathered = sharding.to_host(params)
  if process_id == 0:
    np.savez(os.path.join(out_dir, "multihost.npz"), **gathered)
    with open(os.path.join(out_dir, "multihost.json"), "w") as f:
      json.dump(info, f)
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()


# ----------------------------------------------------------------------------- the Trainer on a mesh

TRAINER_OVERRIDES = [
    # Runs in different workdirs (1 device vs a mesh) are compared bit for bit: a public seed, test-only.
    "insecure_reproducible_seed=7",
    "num_steps=3", "batch_schedule=constant:96", "microbatch_size=4", "max_microbatches=4", "eval_every=0",
    "checkpoint_every=2", "tensorboard=False", "log_every=0", "task.num_train=2048", "task.num_eval=512",
]


def trainer_config(workdir, mesh=None):
  """The built-in synthetic CTR config, shrunk; ``mesh=(data, fsdp)`` turns the mesh on."""
  from dpmega.train import config as config_lib
  from dpmega.tasks import builtin as tasks_builtin
  c = config_lib.base_config()
  c.task = tasks_builtin.default_task_config()
  c.noise_multiplier = 1.0
  config_lib.apply_overrides(c, TRAINER_OVERRIDES + [f"workdir={workdir}"])
  if mesh is not None:
    c.mesh.enabled, c.mesh.data, c.mesh.fsdp, c.mesh.min_shard_size = True, mesh[0], mesh[1], 0
  return c


def flat_params(params):
  import jax
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def trainer8(out_dir):
  from dpmega import train as train_lib
  quiet = lambda s: None
  arrays, info = {}, {}
  runs = {"one": None, "d2f4": (2, 4)}
  for name, mesh in runs.items():
    r = train_lib.train(trainer_config(os.path.join(out_dir, name), mesh), out=quiet)
    info[name] = {"steps": r.steps, "epsilon": r.epsilon, "eval": r.eval_metrics,
                  "sampled": [h["sampled"] for h in r.history]}
    arrays.update({f"{name}/{k}": v for k, v in flat_params(r.params).items()})
  # Crash the FSDP run after step 3, before its final checkpoint, and resume it from its newest checkpoint
  # (step 2): it must redo step 3 exactly, with the secret from that checkpoint. (A rewind with
  # --resume_step would re-key the redone steps instead.)
  class Crash(Exception):
    pass

  def crash_after_step_3(line):
    if line.startswith("step 3/"):
      raise Crash()

  cut = trainer_config(os.path.join(out_dir, "d2f4_cut"), runs["d2f4"])
  cut.log_every = 1
  try:
    train_lib.train(cut, out=crash_after_step_3)
    raise AssertionError("the run did not reach step 3")
  except Crash:
    pass
  r = train_lib.train(cut, resume=True, out=quiet)
  info["d2f4_resumed"] = {"steps": r.steps, "epsilon": r.epsilon}
  arrays.update({f"d2f4_resumed/{k}": v for k, v in flat_params(r.params).items()})
  np.savez(os.path.join(out_dir, "trainer8.npz"), **arrays)
  with open(os.path.join(out_dir, "trainer8.json"), "w") as f:
    json.dump(info, f)


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["devices8", "multihost", "trainer8"])
  parser.add_argument("out_dir")
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--port", type=int, default=0)
  args = parser.parse_args(argv)
  if args.mode == "devices8":
    devices8(args.out_dir)
  elif args.mode == "trainer8":
    trainer8(args.out_dir)
  else:
    multihost(args.out_dir, args.process_id, args.num_processes, args.port)
  return 0


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main(sys.argv[1:]))
