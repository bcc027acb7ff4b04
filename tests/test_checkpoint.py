"""Orbax checkpoints: exact round trip, atomic saves, corrupt or partial checkpoints are named, not used."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpmega.train import checkpoint
from dpmega.train.checkpoint import CheckpointError
from dpmega.train.checkpoint import Checkpointer


def _state(seed=0):
  params = {"dense": {"w": jax.random.normal(jax.random.key(seed), (5, 3)), "b": jnp.zeros(3)},
            "embed": jnp.arange(12.0).reshape(4, 3)}
  opt = optax.chain(optax.clip(1.0), optax.adam(1e-3))
  opt_state = opt.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  _, opt_state = opt.update(grads, opt_state, params)
  return {"params": params, "opt_state": opt_state, "step": np.int32(7),
          "rng": jax.random.key_data(jax.random.key(seed))}


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_is_exact_for_params_optimizer_state_keys_and_meta(tmp_path):
  state = _state()
  meta = {"ledger": {"format": 1, "runs": [{"steps": 7}]}, "sampler": {"position": 7}, "epsilon": 1.25}
  with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
    ckpt.save(7, state, meta)
    restored, got_meta = ckpt.restore(_state(seed=1))  # template: structure only
  _assert_trees_equal(jax.tree_util.tree_map(np.asarray, state), restored)
  assert {k: got_meta[k] for k in meta} == meta and got_meta["step"] == 7


def test_keeps_the_newest_checkpoints(tmp_path):
  with Checkpointer(str(tmp_path), max_to_keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(), {})
    assert ckpt.steps() == [2, 3]


def test_max_to_keep_below_two_is_refused(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    Checkpointer(str(tmp_path), max_to_keep=1)


def test_unfinished_save_is_invisible_and_the_previous_checkpoint_is_used(tmp_path):
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(2, _state(), {"at": 2})
  # What a process killed mid-save leaves: Orbax's temporary folder, never renamed.
  partial = tmp_path / "4.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_bytes(b"\x00" * 10)
  with Checkpointer(str(tmp_path)) as ckpt:
    assert ckpt.steps() == [2]
    assert ckpt.unfinished() == [str(partial)]
    _, meta = ckpt.restore(_state())
  assert meta["at"] == 2


def _corrupt_arrays(step_dir):
  n = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) > 0 and not name.endswith("_METADATA") and "metadata" not in name:
        with open(path, "r+b") as f:
          f.seek(0)
          f.write(b"\xff" * min(64, os.path.getsize(path)))
        n += 1
  assert n


# Orbax's failed read of damaged arrays leaves a callback for an asyncio loop it already closed.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["arrays", "meta_edited", "meta_missing"])
def test_corrupt_checkpoint_is_a_clear_error_and_the_previous_one_stays_usable(tmp_path, damage):
  with Checkpointer(str(tmp_path)) as ckpt:
    ckpt.save(2, _state(), {"at": 2})
    ckpt.save(4, _state(seed=3), {"at": 4, "epsilon": 1.0})
  step_dir = str(tmp_path / "4")
  if damage == "arrays":
    _corrupt_arrays(step_dir)
  elif damage == "meta_edited":
    path = os.path.join(step_dir, "meta", "metadata")
    meta = json.load(open(path))
    meta["epsilon"] = 0.5  # a smaller epsilon than was spent must not be accepted
    json.dump(meta, open(path, "w"))
  else:
    os.remove(os.path.join(step_dir, "meta", "metadata"))
  with Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(CheckpointError, match=r"step 4 .*corrupt.*\[2\].*--resume_step 2"):
      ckpt.restore(_state())
    assert ckpt.steps() == [2, 4]  # nothing deleted
    restored, meta = ckpt.restore(_state(), step=2)
  assert meta["at"] == 2
  _assert_trees_equal(restored, jax.tree_util.tree_map(np.asarray, _state()))


def test_restore_errors_name_the_problem(tmp_path):
  with Checkpointer(str(tmp_path)) as ckpt:
    with pytest.raises(CheckpointError, match="no checkpoint"):
      ckpt.restore(_state())
    ckpt.save(3, _state(), {})
    with pytest.raises(CheckpointError, match=r"one of the checkpoints \[3\]"):
      ckpt.restore(_state(), step=5)
    wrong = {"params": {"w": np.zeros(2)}, "opt_state": (), "step": np.int32(0), "rng": np.zeros(2, np.uint32)}
    with pytest.raises(CheckpointError, match="step 3"):
      ckpt.restore(wrong)


def test_set_aside_moves_newer_checkpoints_without_deleting(tmp_path):
  with Checkpointer(str(tmp_path / "c")) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(), {})
    moved = ckpt.set_aside_after(1)
    assert ckpt.steps() == [1]
  assert sorted(os.path.basename(p) for p in moved) == ["2", "3"]
  assert all(os.path.isdir(p) for p in moved)


def test_digest_covers_values_and_meta():
  s = _state()
  d = checkpoint.tree_digest(s, {"a": 1})
  assert d == checkpoint.tree_digest(jax.tree_util.tree_map(np.asarray, s), {"a": 1})
  assert d != checkpoint.tree_digest(s, {"a": 2})
  t = jax.tree_util.tree_map(np.asarray, s)
  t["params"]["embed"] = t["params"]["embed"].copy()
  t["params"]["embed"][0, 0] += 1e-6
  assert d != checkpoint.tree_digest(t, {"a": 1})
