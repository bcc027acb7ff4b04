"""Invariant 7: the mechanism's randomness is secret (issue 14 part 2).

Noise and Poisson samples are pure functions of (root secret, generation,
step). If the secret were public -- a default seed, a seed in ``config.json``,
a key fingerprint in ``metrics.jsonl`` -- anyone could regenerate the noise,
subtract it and read the exact clipped gradient sums. These tests check that a
run draws a fresh secret, keeps it in its checkpoints only, reuses it exactly
on resume, and that the explicit public-seed option is labelled as not private.
"""

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpmega import cli
from dpmega.train import config as config_lib
from dpmega import noise
from dpmega import sampling
from dpmega import train as train_lib
from dpmega.train.checkpoint import Checkpointer
from dpmega.errors import UsageError
from dpmega.tasks import build_task
from tests.interrupts import Interrupt
from tests.interrupts import interrupt_at
from tests import train_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- key derivation


def test_step_key_is_hmac_sha256_of_the_secret_domain_generation_and_step():
  # A known-answer check that pins the derivation (checkpoints written today must resume tomorrow).
  secret = bytes(range(32))
  msg = b"dpmega/noise/v1\x00" + (2).to_bytes(8, "big") + (7).to_bytes(8, "big")
  want = np.frombuffer(hmac.new(secret, msg, hashlib.sha256).digest()[:8], "<u4")
  got = jax.random.key_data(noise.step_key(secret, 7, generation=2))
  np.testing.assert_array_equal(np.asarray(got), want)
  assert str(jax.random.key_impl(noise.step_key(secret, 7))) == "threefry2x32"


def test_keys_differ_across_steps_generations_secrets_and_domains():
  s, other = noise.secret_bytes(), noise.secret_bytes()
  data = lambda k: np.asarray(jax.random.key_data(k)).tobytes()
  keys = [data(noise.step_key(s, t, generation=g)) for t in range(50) for g in range(3)]
  keys += [data(noise.prepare_key(s, t)) for t in range(50)]
  keys += [data(noise.step_key(other, t)) for t in range(50)]
  assert len(set(keys)) == len(keys)
  assert data(noise.step_key(s, 3)) == data(noise.step_key(bytearray(s), 3))  # pure in its inputs
  assert noise.sampler_entropy(s, 3) != noise.sampler_entropy(s, 4) != noise.sampler_entropy(other, 4)


@pytest.mark.parametrize("bad", [b"", b"x" * 15, "a" * 32, 12345, None])
def test_a_secret_shorter_than_128_bits_or_not_bytes_is_refused(bad):
  with pytest.raises(ValueError, match="secret must be bytes of length >= 16"):
    noise.step_key(bad, 0)


@pytest.mark.parametrize("field, kwargs", [("step", {"step": -1}), ("step", {"step": 2**63}),
                                           ("generation", {"step": 0, "generation": -1}),
                                           ("step", {"step": True})])
def test_step_and_generation_out_of_range_are_named(field, kwargs):
  with pytest.raises(ValueError, match=field):
    noise.step_key(noise.secret_bytes(), **kwargs)


def test_fresh_secrets_are_256_bits_and_never_repeat():
  draws = {noise.secret_bytes() for _ in range(1000)}
  assert len(draws) == 1000 and {len(d) for d in draws} == {32}
  assert len(noise.secret_bytes(16)) == 16
  with pytest.raises(ValueError, match="num_bytes"):
    noise.secret_bytes(8)
  k1, k2 = noise.secret_key(), noise.secret_key()
  assert not np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))


def test_insecure_secret_is_a_pure_function_of_the_public_seed():
  assert noise.insecure_secret_from_seed(3) == noise.insecure_secret_from_seed(3)
  assert noise.insecure_secret_from_seed(3) != noise.insecure_secret_from_seed(4)
  with pytest.raises(ValueError, match="seed"):
    noise.insecure_secret_from_seed(-1)


def test_secret_words_round_trip():
  s = noise.secret_bytes()
  words = noise.secret_to_words(s)
  assert words.dtype == np.uint32 and words.shape == (8,)
  assert noise.secret_from_words(words) == s
  with pytest.raises(ValueError, match="uint32"):
    noise.secret_from_words(words.astype(np.int64))


def test_default_samplers_are_unpredictable_and_separate_from_the_noise_stream():
  a, b = sampling.PoissonSampler(10_000), sampling.PoissonSampler(10_000)
  assert not np.array_equal(a.indices_at(0, 500), b.indices_at(0, 500))
  assert "secret" not in repr(a) and "_secret" not in str(a.state.to_dict())


# ----------------------------------------------------------------------------- the trainer


@pytest.fixture()
def small_config(tmp_path):
  path = tmp_path / "small.py"
  path.write_text(train_configs.small_train_config(num_train=1000, num_eval=200, num_steps=4))
  return str(path)


def _load(small_config, workdir, *overrides):
  config = config_lib.apply_overrides(config_lib.load_config(small_config), list(overrides))
  config.workdir = str(workdir)
  return config


def _params(result):
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(result.params)])


def _checkpoint_secret(small_config, workdir, step=None):
  config = _load(small_config, workdir)
  trainer = train_lib.Trainer(config_lib.validate(config), build_task(config), out=lambda s: None)
  with Checkpointer(os.path.join(str(workdir), "checkpoints")) as ckpt:
    tree, _ = ckpt.restore(trainer._checkpoint_tree(trainer.initial_state()), step=step)
  return noise.secret_from_words(tree["rng"])


def test_two_fresh_runs_draw_different_secrets_noise_and_samples(small_config, tmp_path):
  runs = [train_lib.train(_load(small_config, tmp_path / name), out=lambda s: None) for name in ("a", "b")]
  # The same config, data and (public) init seed: only the secret differs.
  assert not np.array_equal(_params(runs[0]), _params(runs[1]))
  assert [r["sampled"] for r in runs[0].history] != [r["sampled"] for r in runs[1].history]
  assert _checkpoint_secret(small_config, tmp_path / "a") != _checkpoint_secret(small_config, tmp_path / "b")


def test_overwrite_draws_a_new_secret(small_config, tmp_path):
  first = train_lib.train(_load(small_config, tmp_path / "w"), out=lambda s: None)
  secret = _checkpoint_secret(small_config, tmp_path / "w")
  again = train_lib.train(_load(small_config, tmp_path / "w"), overwrite=True, out=lambda s: None)
  assert not np.array_equal(_params(first), _params(again))
  assert _checkpoint_secret(small_config, tmp_path / "w") != secret


def test_resume_keeps_the_secret_of_the_checkpoint(small_config, tmp_path):
  config = _load(small_config, tmp_path / "cut", "num_steps=6", "checkpoint_every=2")
  with pytest.raises(Interrupt):
    train_lib.train(config, out=interrupt_at(3))  # last checkpoint at step 2
  secret = _checkpoint_secret(small_config, tmp_path / "cut", step=2)
  resumed = train_lib.train(config, resume=True, out=lambda s: None)
  assert _checkpoint_secret(small_config, tmp_path / "cut") == secret
  # The uninterrupted run keyed by that secret: the resumed one redoes steps 3-6 exactly.
  ref_config = _load(small_config, tmp_path / "ref", "num_steps=6", "checkpoint_every=2")
  trainer = train_lib.Trainer(config_lib.validate(ref_config), build_task(ref_config), out=lambda s: None)
  assert trainer.secret != secret
  trainer._set_randomness(secret, generation=0)
  ref = trainer.run()
  np.testing.assert_array_equal(_params(resumed), _params(ref))


def test_a_checkpoint_holding_a_public_seeds_key_is_refused(small_config, tmp_path):
  import shutil

  from dpmega.train.checkpoint import CheckpointError

  config = _load(small_config, tmp_path / "w", "checkpoint_every=2")
  train_lib.train(config, out=lambda s: None)
  trainer = train_lib.Trainer(config_lib.validate(config), build_task(config), out=lambda s: None)
  with Checkpointer(os.path.join(config.workdir, "checkpoints")) as ckpt:
    tree, meta = ckpt.restore(trainer._checkpoint_tree(trainer.initial_state()), step=4)
  shutil.rmtree(os.path.join(config.workdir, "checkpoints", "4"))
  with Checkpointer(os.path.join(config.workdir, "checkpoints")) as ckpt:
    # What earlier versions stored: the two uint32 words of jax.random.key(seed) (Orbax restores any shape).
    ckpt.save(4, dict(tree, rng=np.zeros(2, np.uint32)), meta)
  with pytest.raises(CheckpointError, match="holds no secret of at least 128 bits"):
    train_lib.train(config, resume=True, out=lambda s: None)


def test_the_config_seed_field_is_refused_with_the_two_explicit_options(small_config, tmp_path):
  config = _load(small_config, tmp_path / "x")
  config.seed = 0
  with pytest.raises(UsageError, match="init_seed.*insecure_reproducible_seed"):
    config_lib.validate(config)


def test_the_shipped_configs_keep_the_noise_secret():
  for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
    if name.endswith(".py"):
      config = config_lib.load_config(os.path.join(ROOT, "configs", name))
      assert config.insecure_reproducible_seed is None, name
      assert "seed" not in config, name


def test_insecure_seed_is_reproducible_and_labelled_not_private(small_config, tmp_path):
  lines = []
  runs = [train_lib.train(_load(small_config, tmp_path / name, "insecure_reproducible_seed=9"), out=lines.append)
          for name in ("a", "b")]
  np.testing.assert_array_equal(_params(runs[0]), _params(runs[1]))
  label = "noise reproducible by anyone who knows the seed: NOT a private release"
  assert sum(label in line and line.startswith("plan:") for line in lines) == 2
  for name in ("a", "b"):
    for file in ("summary.json", "config.json"):
      with open(tmp_path / name / file) as f:
        assert label in json.load(f)["randomness"], (name, file)
  # The default says that its randomness is secret, in the plan and the summary.
  lines = []
  train_lib.train(_load(small_config, tmp_path / "c"), out=lines.append)
  assert any(line.startswith("plan: randomness secret") for line in lines)
  assert not any("NOT a private release" in line for line in lines)
  with open(tmp_path / "c" / "summary.json") as f:
    assert json.load(f)["randomness"] == train_lib.SECRET_RANDOMNESS


def _forms(secret: bytes, key_datas: list[bytes], entropies: list[int]) -> tuple[list[str], list[bytes]]:
  """Texts and byte strings that would betray the secret or a step key (or confirm a guess of them)."""
  texts, raw = [], [secret]
  for b in [secret, *key_datas]:
    texts += [b.hex(), b.hex().upper(), base64.b64encode(b).decode().rstrip("="),
              base64.urlsafe_b64encode(b).decode().rstrip("="), str(int.from_bytes(b, "big")),
              str(int.from_bytes(b, "little")), str(list(np.frombuffer(b, "<u4").tolist()))]
    for algo in ("sha256", "sha1", "md5", "blake2b", "sha512"):
      digest = hashlib.new(algo, b).digest()
      texts.append(digest.hex()[:12])  # any fingerprint that is a prefix of a common hash
      raw.append(digest[:8])
    raw.append(b)
  texts += [str(e) for e in entropies] + [f"{e:x}" for e in entropies]
  return texts, raw


def test_no_key_material_or_key_oracle_outside_the_checkpoints(small_config, tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "dpmega", "train", "--config", small_config, "--workdir", str(workdir),
                      "--set", "tensorboard=True", "checkpoint_every=2", "eval_every=2", "log_every=1"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  # No field that names key material, fingerprint or not (the old `noise_key` was a key oracle).
  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert records and not any(any(w in k for w in ("key", "rng", "secret", "fingerprint")) for r in records for k in r)
  secret = _checkpoint_secret(small_config, workdir)
  steps = range(4)
  key_datas = [np.asarray(jax.random.key_data(f(secret, t))).tobytes()
               for t in steps for f in (noise.step_key, noise.prepare_key)]
  texts, raw = _forms(secret, key_datas, [noise.sampler_entropy(secret, t) for t in steps])
  files = [os.path.join(d, f) for d, _, fs in os.walk(workdir) for f in fs
           if not os.path.relpath(d, workdir).startswith("checkpoints")]
  names = {os.path.relpath(f, workdir) for f in files}
  assert {"config.json", "metrics.jsonl", "summary.json"} <= names and any(n.startswith("tensorboard") for n in names)
  outputs = {f"file {os.path.relpath(f, workdir)}": open(f, "rb").read() for f in files}
  outputs.update({"stdout": p.stdout.encode(), "stderr": p.stderr.encode()})
  for where, content in outputs.items():
    text = content.decode("utf-8", errors="replace")
    for form in texts:
      assert form not in text, (where, form)
    for form in raw:
      assert form not in content, (where, form.hex())


def test_cli_insecure_seed_flag_sets_the_explicit_option(small_config):
  from dpmega.cli import train as cli_train

  args = cli.build_parser().parse_args(["train", "--config", small_config, "--insecure_reproducible_seed", "5"])
  assert cli_train.build_config(args).insecure_reproducible_seed == 5
  args = cli.build_parser().parse_args(["train", "--config", small_config])
  assert cli_train.build_config(args).insecure_reproducible_seed is None
