"""Meshes and FSDP rules (dpmega/sharding.py), and the trainer's private step on them (dpmega/train/step.py).

Every mesh check goes through the trainer's step builder,
:func:`dpmega.train.step.make_private_step`: the functions tested here are the
ones ``dpmega train`` runs.

The 8-device checks run in one subprocess (``tests/mesh_worker.py devices8``)
started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``: JAX fixes
its device count at start-up, so they cannot run inside this pytest process.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmega import clipping
from dpmega import noise
from dpmega import sharding
from dpmega.train import step as step_lib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mesh_worker  # noqa: E402

WORKER_TIMEOUT_S = 400


# ----------------------------------------------------------------------------- 8 simulated devices


def _run_worker_on_8_devices(tmp_path_factory, mode):
  """Runs ``mesh_worker.py MODE`` on 8 simulated CPU devices; returns its (json info, npz arrays)."""
  out = tmp_path_factory.mktemp(mode)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "mesh_worker.py"), mode, str(out)],
                        env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(out / f"{mode}.json") as f:
    info = json.load(f)
  return info, dict(np.load(out / f"{mode}.npz"))


@pytest.fixture(scope="module")
def devices8(tmp_path_factory):
  return _run_worker_on_8_devices(tmp_path_factory, "devices8")


def test_same_params_after_several_steps_on_1_and_8_devices(devices8):
  info, arrays = devices8
  assert info["d8/mesh"] == {"data": 8, "fsdp": 1} and info["d2f4/mesh"] == {"data": 2, "fsdp": 4}
  assert info["sample_counts"]["d1"] == info["sample_counts"]["d8"] == info["sample_counts"]["d2f4"]
  for name in ("w1", "b1", "w2"):
    ref = arrays[f"d1/{name}"]
    assert not np.allclose(ref, mesh_worker.init_params()[name])  # it trained
    for mesh in ("d8", "d2f4"):
      np.testing.assert_allclose(arrays[f"{mesh}/{name}"], ref, rtol=1e-5, atol=1e-6, err_msg=f"{mesh}/{name}")


def test_params_and_optimizer_state_sharded_when_asked(devices8):
  info, _ = devices8
  assert info["d2f4/param_specs"] == {"w1": "P(None, 'fsdp')", "b1": "P('fsdp',)", "w2": "P('fsdp',)"}
  assert info["d2f4/param_shard_shapes"] == {"w1": [8, 8], "b1": [8], "w2": [8, 4]}
  # adam: count (scalar, replicated), then mu and nu sharded like their params.
  assert info["d2f4/opt_specs"].count("P()") == 1
  assert sum("fsdp" in s for s in info["d2f4/opt_specs"]) == 6
  assert sorted(map(tuple, info["d2f4/opt_shard_shapes"])) == sorted(
      [()] + 2 * [(8,), (8, 8), (8, 4)])
  # Pure data parallel: replicated.
  assert set(info["d8/param_specs"].values()) == {"P()"}
  assert set(info["d8/opt_specs"]) == {"P()"}


def test_per_example_clipping_holds_on_every_shard(devices8):
  info, arrays = devices8
  c = mesh_worker.CLIP_NORM
  # One huge example on device d (d = 0..7), the rest masked: the sum is that example, clipped to C.
  assert len(info["single_example_norms"]) == 8
  for norm in info["single_example_norms"]:
    assert c * 0.999 <= norm <= c * (1 + 1e-5)
  assert info["clip_counts"] == [[1, 1]] * 8
  # A whole chunk on a (data=4, fsdp=2) mesh equals the one-device clipped sum.
  for name in ("w1", "b1", "w2"):
    np.testing.assert_allclose(arrays[f"chunk_sharded/{name}"], arrays[f"chunk_single/{name}"], rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_allclose(info["chunk_stats"]["sharded"], info["chunk_stats"]["single"], rtol=1e-5)
  assert info["chunk_grad_specs"]["w1"] == "P(None, 'fsdp')"  # reduce-scattered, not gathered


def test_noise_drawn_once_per_step_not_per_device(devices8):
  info, arrays = devices8
  expected = info["noise_expected_std"]
  ref = np.concatenate([arrays["noise_d1/w"].ravel(), arrays["noise_d1/v"]])
  for mesh in ("d1", "d8", "d1f8"):
    draw = np.concatenate([arrays[f"noise_{mesh}/w"].ravel(), arrays[f"noise_{mesh}/v"]])
    # 2^16 + 64 coordinates: the std is known to ~0.3%; sqrt(8)x or 1/sqrt(8)x would be far off.
    assert abs(draw.std() / expected - 1) < 0.03, (mesh, draw.std(), expected)
    assert abs(draw.mean()) < 5 * expected / np.sqrt(draw.size)
    # Sharding-independent draws: the same numbers on 1 device, 8 replicas and 8 shards.
    np.testing.assert_array_equal(draw, ref)
  assert info["noise_d1f8/w_spec"] == "P('fsdp',)"
  shards = [tuple(s) for s in info["noise_d1f8/w_shards"]]
  assert len(set(shards)) == 8  # no two devices drew the same numbers


def test_threefry_partitionable_is_on_by_default(devices8):
  info, _ = devices8
  assert info["threefry_partitionable"] is True
  assert jax.config.jax_threefry_partitionable


# ----------------------------------------------------------------------------- one device, in process


def test_mesh_config_rejects_bad_sizes():
  with pytest.raises(ValueError, match="fsdp"):
    sharding.MeshConfig(fsdp=0)
  with pytest.raises(ValueError, match="data"):
    sharding.MeshConfig(data=0)
  with pytest.raises(ValueError, match="min_shard_size"):
    sharding.MeshConfig(min_shard_size=-1)
  with pytest.raises(ValueError, match="fsdp must be an int in \\[1, 4\\]"):
    sharding.MeshConfig(fsdp=8).shape(4)
  with pytest.raises(ValueError, match="data must be an int in \\[1, 2\\]"):
    sharding.MeshConfig(data=3, fsdp=2).shape(4)
  assert sharding.MeshConfig().shape(8) == (8, 1)
  assert sharding.MeshConfig(fsdp=4).shape(8) == (2, 4)
  assert sharding.MeshConfig(data=1).shape(8) == (1, 1)


def test_make_mesh_defaults_to_every_device():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == (sharding.DATA_AXIS, sharding.FSDP_AXIS)
  assert mesh.size == jax.device_count()
  with pytest.raises(ValueError, match="fsdp"):
    sharding.make_mesh(sharding.MeshConfig(fsdp=jax.device_count() + 1))


def test_fsdp_spec_shards_largest_divisible_dim_of_big_leaves():
  P = jax.sharding.PartitionSpec
  assert sharding.fsdp_spec((1024, 4096), 8, min_size=0) == P(None, "fsdp")
  assert sharding.fsdp_spec((4096, 1024), 8, min_size=0) == P("fsdp")
  assert sharding.fsdp_spec((30522, 1024), 8, min_size=0) == P(None, "fsdp")  # 30522 % 8 != 0
  assert sharding.fsdp_spec((1024, 1024), 8, min_size=0) == P(None, "fsdp")  # tie: last dim
  assert sharding.fsdp_spec((7, 9), 8, min_size=0) == P()  # nothing divisible
  assert sharding.fsdp_spec((1024,), 8, min_size=2048) == P()  # too small
  assert sharding.fsdp_spec((1024, 1024), 1, min_size=0) == P()  # no fsdp axis
  assert sharding.fsdp_spec((), 8, min_size=0) == P()


def test_param_shardings_rule_depends_on_shape_only():
  import optax
  mesh = sharding.make_mesh()
  params = {"a": jnp.zeros((4, 8)), "b": jnp.zeros((3,))}
  opt_state = jax.eval_shape(optax.adam(1e-3).init, params)
  p_sh = sharding.param_shardings(params, mesh)
  o_sh = sharding.param_shardings(opt_state, mesh)
  assert p_sh["a"].spec == o_sh[0].mu["a"].spec == o_sh[0].nu["a"].spec
  assert all(isinstance(s, jax.sharding.NamedSharding) for s in jax.tree_util.tree_leaves(o_sh))


def _one_device_setup():
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  params = mesh_worker.init_params()
  sh = sharding.param_shardings(params, mesh, min_size=0)
  x, y = mesh_worker.dataset()
  return mesh, params, sh, {"x": x[:16], "y": y[:16]}


def test_accumulate_on_one_device_equals_clipped_grad_sum_and_adds_to_the_sum():
  mesh, params, sh, batch = _one_device_setup()
  mask = (np.arange(16) % 3 != 0).astype(np.float32)
  acc = step_lib.make_accumulate_fn(mesh_worker.loss_fn, mesh, sh, clip_norm=0.1, microbatch_size=4)
  start = step_lib.Accumulator(sharding.shard(jax.tree_util.tree_map(np.ones_like, params), sh),
                               clipping.ClipStats.zeros())
  g, stats = acc(sharding.shard(params, sh), start, sharding.global_batch_from_process_local(batch, mesh),
                 sharding.global_batch_from_process_local(mask, mesh))
  ref, _, ref_stats = clipping.clipped_grad_sum(mesh_worker.loss_fn, params, batch, mask, clip_norm=0.1)
  for k in params:
    np.testing.assert_allclose(np.asarray(g[k]), 1 + np.asarray(ref[k]), rtol=1e-5, atol=1e-6)
  assert int(stats.num_examples) == int(ref_stats.num_examples) == int(mask.sum())


def test_accumulate_rejects_rows_that_do_not_fill_micro_batches():
  mesh, params, sh, batch = _one_device_setup()
  acc = step_lib.make_accumulate_fn(mesh_worker.loss_fn, mesh, sh, clip_norm=0.1, microbatch_size=3)
  zero = step_lib.Accumulator(sharding.zeros_like_sharded(params, sh), clipping.ClipStats.zeros())
  with pytest.raises(ValueError, match="multiple of mesh.size \\* microbatch_size = 3"):
    acc(params, zero, batch, np.ones(16))
  with pytest.raises(ValueError, match="microbatch_size"):
    step_lib.make_accumulate_fn(mesh_worker.loss_fn, mesh, sh, clip_norm=0.1, microbatch_size=0)
  with pytest.raises(ValueError, match="clip_norm"):
    step_lib.make_accumulate_fn(mesh_worker.loss_fn, mesh, sh, clip_norm=-1.0, microbatch_size=1)
  with pytest.raises(ValueError, match="clipping"):
    step_lib.make_accumulate_fn(mesh_worker.loss_fn, mesh, sh, clip_norm=1.0, microbatch_size=1, clipping="nope")


def _sgd_state(params, sh, opt):
  return step_lib.TrainState(jnp.zeros((), jnp.int32), sharding.shard(params, sh), opt.init(params))


def test_update_fn_validates_and_divides_by_expected_batch_size():
  import optax
  mesh, params, sh, _ = _one_device_setup()
  opt = optax.sgd(1.0)  # new params = params - noisy mean: the noisy mean is read off exactly
  o_sh = sharding.param_shardings(jax.eval_shape(opt.init, params), mesh, min_size=0)
  update = step_lib.make_update_fn(opt, mesh, sh, o_sh, clip_norm=1.0)
  ones = sharding.shard(jax.tree_util.tree_map(np.ones_like, params), sh)
  new, metrics = update(_sgd_state(params, sh, opt), ones, noise.step_key(noise.secret_bytes(), 0), 0.0, 4.0)
  np.testing.assert_array_equal(np.asarray(new.params["w1"]), params["w1"] - np.float32(0.25))
  assert int(new.step) == 1 and float(metrics["params_finite"]) == 1.0
  with pytest.raises(ValueError, match="noise_multiplier"):
    update(_sgd_state(params, sh, opt), ones, noise.step_key(noise.secret_bytes(), 0), -1.0, 4.0)
  with pytest.raises(ValueError, match="expected_batch_size"):
    update(_sgd_state(params, sh, opt), ones, noise.step_key(noise.secret_bytes(), 0), 1.0, 0.0)
  with pytest.raises(ValueError, match="clip_norm"):
    step_lib.make_update_fn(opt, mesh, sh, o_sh, clip_norm=float("inf"))(
        _sgd_state(params, sh, opt), ones, noise.step_key(noise.secret_bytes(), 0), 1.0, 4.0)


def test_the_mesh_path_has_no_key_function_of_its_own():
  # One key function for the trainer, the mesh path and user loops: dpmega.noise.step_key (of a secret).
  assert not hasattr(sharding, "step_key")


def test_broadcast_secret_on_one_process_returns_it_and_validates():
  secret = noise.secret_bytes()
  assert sharding.broadcast_secret(secret) == secret
  with pytest.raises(ValueError, match="secret"):
    sharding.broadcast_secret(b"short")


def test_check_partitionable_rng_raises_when_disabled_and_the_trainer_runs_it(tmp_path):
  from dpmega import train as train_lib
  sharding.check_partitionable_rng()
  jax.config.update("jax_threefry_partitionable", False)
  try:
    with pytest.raises(RuntimeError, match="jax_threefry_partitionable"):
      sharding.check_partitionable_rng()
    # Where training runs: building the trainer's step (1 x 1 mesh by default) checks it.
    with pytest.raises(RuntimeError, match="jax_threefry_partitionable"):
      train_lib.train(mesh_worker.trainer_config(str(tmp_path)), out=lambda s: None)
  finally:
    jax.config.update("jax_threefry_partitionable", True)


def test_global_batch_from_process_local_on_one_process_is_batch_sharded():
  mesh = sharding.make_mesh()
  out = sharding.global_batch_from_process_local({"x": np.arange(6.0).reshape(3, 2)}, mesh)
  assert out["x"].sharding == sharding.batch_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(out["x"]), np.arange(6.0).reshape(3, 2))
  with pytest.raises(ValueError, match="leading axis"):
    sharding.global_batch_from_process_local({"x": np.float32(1.0)}, mesh)


def test_the_private_steps_chunks_read_each_sampled_row_once():
  import optax
  from dpmega.data.sources import ArraySource
  mesh = sharding.make_mesh()
  source = ArraySource({"i": np.arange(100, dtype=np.int64)})
  indices = np.array([3, 8, 9, 20, 41, 77, 99])
  private_step = step_lib.make_private_step(mesh_worker.loss_fn, optax.sgd(1.0), mesh, mesh_worker.init_params(),
                                            clip_norm=1.0, microbatch_size=2, max_microbatches=2)
  chunks = list(private_step.chunks(source, indices))
  assert [len(c.mask) for c in chunks] == [4, 4]  # 2 full micro-batches, then a padded one
  real = np.concatenate([c.batch["i"][:c.num_real] for c in chunks])
  np.testing.assert_array_equal(real, indices)
  assert sum(c.mask.sum() for c in chunks) == len(indices)


def test_to_host_returns_numpy_copies():
  mesh = sharding.make_mesh()
  tree = {"a": sharding.shard(np.arange(4.0), sharding.replicated(mesh)), "b": np.ones(2)}
  out = sharding.to_host(tree)
  assert isinstance(out["a"], np.ndarray)
  np.testing.assert_array_equal(out["a"], np.arange(4.0))


# ----------------------------------------------------------------------------- the Trainer on 8 devices


@pytest.fixture(scope="module")
def trainer8(tmp_path_factory):
  return _run_worker_on_8_devices(tmp_path_factory, "trainer8")


def test_trainer_on_a_mesh_matches_one_device(trainer8):
  info, arrays = trainer8
  names = [k.split("/", 1)[1] for k in arrays if k.startswith("one/")]
  assert names
  for mesh in ("d2f4",):
    assert info[mesh]["steps"] == info["one"]["steps"] == 3
    assert info[mesh]["sampled"] == info["one"]["sampled"]  # the same Poisson batches
    assert info[mesh]["epsilon"] == info["one"]["epsilon"]
    for name in names:
      np.testing.assert_allclose(arrays[f"{mesh}/{name}"], arrays[f"one/{name}"], rtol=1e-5, atol=1e-6,
                                 err_msg=f"{mesh}{name}")


def test_trainer_resumes_a_sharded_run_exactly(trainer8):
  info, arrays = trainer8
  assert info["d2f4_resumed"] == {"steps": 3, "epsilon": info["d2f4"]["epsilon"]}
  for k in arrays:
    if k.startswith("d2f4/"):
      np.testing.assert_array_equal(arrays["d2f4_resumed/" + k[5:]], arrays[k])


def test_trainer_rejects_a_mesh_larger_than_the_devices(tmp_path):
  from dpmega import train as train_lib
  from dpmega.errors import UsageError
  with pytest.raises(UsageError, match="mesh: fsdp must be an int in \\[1, 1\\]"):
    train_lib.train(mesh_worker.trainer_config(str(tmp_path), mesh=(0, 2)), out=lambda s: None)
