"""Normalized clipping and per-group clip budgets (dpmega.clipping.rules): sensitivity C, equal in every mode.

The bound tests add ONE example (a one-example mask, sigma = 0) through the public
``dpmega.private_value_and_grad`` and measure in float64 what was added, per group and in total, on crafted
inputs (cancelling rows, duplicate ids, tiny and huge magnitudes) for a model with a row lookup, a Dense layer
shared over positions and a bias (the three clipping paths: rows, Gram, vmap).
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import dpmega
from dpmega import clipping
from dpmega.clipping import ClipRule
from dpmega.clipping import parse_clip_groups
from dpmega.errors import UsageError
from dpmega.train import config as config_lib

MODES = dpmega.clipping_modes()
BOUND = 1 + 1e-5
GROUPS = "table=0.64;.*=0.36"  # budgets 0.8 C and 0.6 C


class _Model(nn.Module):
  """A row lookup (``table``), a Dense shared over positions (Gram path) and a bias (vmap path)."""

  @nn.compact
  def __call__(self, ids, x):
    rows = nn.Embed(9, 3, name="table")(ids)  # [n, 3]
    h = nn.Dense(3, use_bias=False, name="dense")(x)  # [n, 3]
    bias = self.param("bias", nn.initializers.zeros, (3,))
    return jnp.mean(rows + h, axis=0) + 1e-4 * jnp.sin(bias)


MODEL = _Model()
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((4,), jnp.int32), jnp.ones((4, 5)))


def _loss(p, ex):
  return jnp.sum(MODEL.apply(p, ex["ids"], ex["x"]) * ex["t"])


def _group_of(path):
  return 0 if "table" in path else 1


def _norms_f64(tree):
  """(group 0 norm, group 1 norm, total) in float64."""
  sq = [0.0, 0.0]
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    sq[_group_of(jax.tree_util.keystr(path))] += float(np.sum(np.asarray(x, np.float64) ** 2))
  return np.sqrt(sq[0]), np.sqrt(sq[1]), np.sqrt(sq[0] + sq[1])


@functools.lru_cache(maxsize=None)
def _contribution_fn(rule, mode, clip_norm):
  f = dpmega.private_value_and_grad(_loss, clip_norm=clip_norm, noise_multiplier=0.0, expected_batch_size=1.0,
                                    clipping=mode, clip_rule=rule)
  return jax.jit(lambda params, batch, mask: f(params, batch, jax.random.key(0), mask=mask))


def _contribution(rule, mode, batch, i, clip_norm=1.0):
  b = batch["ids"].shape[0]
  _, grads, stats = _contribution_fn(rule, mode, clip_norm)(PARAMS, batch, jnp.zeros((b,)).at[i].set(1.0))
  return grads, stats


def _crafted(rng, exp, cancel, big):
  x = rng.normal(size=(4, 5))
  if cancel:
    v = rng.normal(size=5) * 10.0 ** big
    x[0], x[1] = v, -v + x[1]
  with np.errstate(over="ignore"):
    return np.clip(x * 10.0 ** exp, -3e38, 3e38).astype(np.float32)


def _batch(seed, exp_x, exp_t, cancel, big, b=3):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 9, size=(b, 4))
  ids[:, 1] = ids[:, 0]  # duplicate ids
  x = np.stack([_crafted(rng, exp_x, cancel, big) for _ in range(b)])
  t = (rng.normal(size=(b, 3)) * 10.0 ** exp_t).astype(np.float32)
  return {"ids": jnp.asarray(ids, jnp.int32), "x": jnp.asarray(x), "t": jnp.asarray(t)}


RULES = {
    "normalized": ClipRule(normalize=True),
    "groups": ClipRule(groups=parse_clip_groups(GROUPS)),
    "normalized_groups": ClipRule(normalize=True, groups=parse_clip_groups(GROUPS)),
}


@settings(max_examples=12, deadline=None)
@pytest.mark.parametrize("rule_name", sorted(RULES))
@given(p=st.fixed_dictionaries({"seed": st.integers(0, 2**16), "exp_x": st.integers(-25, 25),
                                "exp_t": st.integers(-20, 20), "cancel": st.booleans(), "big": st.integers(0, 9)}))
def test_each_contribution_within_its_group_budget_and_c_in_every_mode(rule_name, p):
  rule = RULES[rule_name]
  batch = _batch(p["seed"], p["exp_x"], p["exp_t"], p["cancel"], p["big"])
  budgets = np.asarray(rule.budgets(1.0), np.float64)
  for mode in MODES:
    grads, _ = _contribution(rule, mode, batch, i=0)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(grads))
    g0, g1, total = _norms_f64(grads)
    assert total <= BOUND, (mode, total)
    if rule.groups:
      assert g0 <= budgets[0] * BOUND and g1 <= budgets[1] * BOUND, (mode, g0, g1)


def _reference(rule, batch, clip_norm):
  """The clipped sum from per-example float64 gradients and the rule's formula, written out here."""
  grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0))(PARAMS, batch)
  flat = [(jax.tree_util.keystr(path), np.asarray(x, np.float64))
          for path, x in jax.tree_util.tree_flatten_with_path(grads)[0]]
  b = batch["ids"].shape[0]
  shares = [0.64, 0.36] if rule.groups else [1.0]
  group = (lambda path: _group_of(path)) if rule.groups else (lambda path: 0)
  norms = np.zeros((len(shares), b))
  for path, g in flat:
    norms[group(path)] += np.sum(g.reshape(b, -1) ** 2, axis=1)
  norms = np.sqrt(norms)
  budget = clip_norm * np.sqrt(shares)[:, None]
  w = budget / (norms + rule.stability * budget) if rule.normalize else np.minimum(1.0, budget / norms)
  return {path: np.tensordot(w[group(path)], g, axes=1) for path, g in flat}


@pytest.mark.parametrize("rule_name", sorted(RULES))
@pytest.mark.parametrize("clip_norm", [0.05, 3.0])
def test_every_mode_equals_the_written_out_rule_on_benign_inputs(rule_name, clip_norm):
  rule = RULES[rule_name]
  batch = _batch(7, 0, 0, False, 0, b=6)
  want = _reference(rule, batch, clip_norm)
  for mode in MODES:
    got, _, stats = clipping.clipped_grad_sum(_loss, PARAMS, batch, clip_norm=clip_norm, microbatch_size=3,
                                              clipping=mode, clip_rule=rule)
    for path, x in jax.tree_util.tree_flatten_with_path(got)[0]:
      np.testing.assert_allclose(np.asarray(x), want[jax.tree_util.keystr(path)], rtol=2e-5, atol=1e-6,
                                 err_msg=f"{mode} {jax.tree_util.keystr(path)}")
    assert int(stats.num_examples) == 6


def test_groups_clip_each_group_on_its_own_and_count_an_example_clipped_in_any_group():
  # Only the table's gradient is large: under one budget the whole example shrinks; with groups only the table.
  batch = _batch(3, -4, 2, False, 0, b=4)
  plain, _, s_plain = clipping.clipped_grad_sum(_loss, PARAMS, batch, clip_norm=1.0)
  grouped, _, s_grouped = clipping.clipped_grad_sum(_loss, PARAMS, batch, clip_norm=1.0,
                                                    clip_rule=RULES["groups"])
  free, _, _ = clipping.clipped_grad_sum(_loss, PARAMS, batch, clip_norm=np.inf)
  g0 = [_norms_f64(jax.tree_util.tree_map(lambda x: x[i], jax.vmap(jax.grad(_loss), in_axes=(None, 0))(
      PARAMS, batch)))[:2] for i in range(4)]
  assert all(n0 > 0.8 and n1 < 0.6 for n0, n1 in g0)  # the table is clipped, the rest is not, in every example
  np.testing.assert_allclose(grouped["params"]["dense"]["kernel"], free["params"]["dense"]["kernel"], rtol=1e-5)
  assert not np.allclose(plain["params"]["dense"]["kernel"], free["params"]["dense"]["kernel"], rtol=1e-2)
  assert int(s_grouped.num_clipped) == int(s_plain.num_clipped) == 4


def test_normalized_clipping_scales_every_example_to_just_under_c():
  batch = _batch(5, 0, 0, False, 0, b=4)
  for scale in (1e-6, 1.0, 1e6):  # small and large gradients alike end near C (the stability term aside)
    b = dict(batch, t=batch["t"] * scale)
    grads, _ = _contribution(RULES["normalized"], "auto", b, i=1, clip_norm=2.0)
    total = _norms_f64(grads)[2]
    norm = _norms_f64(jax.tree_util.tree_map(lambda x: x[1], jax.vmap(jax.grad(_loss), in_axes=(None, 0))(
        PARAMS, b)))[2]
    np.testing.assert_allclose(total, 2.0 * norm / (norm + 0.01 * 2.0), rtol=1e-5)
    assert total <= 2.0 * BOUND


def test_zero_gradient_and_zero_clip_norm_give_zero_not_nan():
  batch = _batch(1, 0, 0, False, 0, b=2)
  zero_t = dict(batch, t=jnp.zeros_like(batch["t"]))
  for rule in RULES.values():
    for mode in MODES:
      # One compiled sum per (rule, mode); the batch and the clip norm are its arguments.
      clipped = jax.jit(lambda bt, c, mode=mode, rule=rule: clipping.clipped_grad_sum(
          _loss, PARAMS, bt, clip_norm=c, clipping=mode, clip_rule=rule)[0])
      for bt, c in ((zero_t, 1.0), (batch, 0.0)):
        g = clipped(bt, jnp.float32(c))
        assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree_util.tree_leaves(g))


@pytest.mark.parametrize("spec, match", [
    ("table=0.7;.*=0.4", "sum to at most 1"),
    ("table=0", r"share of 'table'.*\(0"),
    ("table=1.5", r"share of 'table'"),
    ("table", "regex=share"),
    ("[=0.5", "not a regular expression"),
    ("table=abc", "must be a number"),
])
def test_bad_group_specs_are_refused_naming_clip_groups(spec, match):
  with pytest.raises(ValueError, match=match):
    parse_clip_groups(spec)


def test_unmatched_parameters_and_empty_groups_are_refused_before_compute():
  batch = _batch(0, 0, 0, False, 0, b=2)
  with pytest.raises(ValueError, match="matches none of"):
    clipping.clipped_grad_sum(_loss, PARAMS, batch, clip_norm=1.0, clip_rule=ClipRule(groups=(("table", 0.5),)))
  with pytest.raises(ValueError, match=r"\['tabel'\] match no parameter"):
    clipping.clipped_grad_sum(_loss, PARAMS, batch, clip_norm=1.0,
                              clip_rule=ClipRule(groups=(("tabel", 0.5), (".*", 0.5))))
  with pytest.raises(ValueError, match="finite with normalized clipping"):
    dpmega.private_value_and_grad(_loss, clip_norm=float("inf"), noise_multiplier=0.0, expected_batch_size=1.0,
                                  clip_rule=ClipRule(normalize=True))
  with pytest.raises(ValueError, match="stability"):
    ClipRule(normalize=True, stability=0.0)


def _synthetic_ctr(tmp_path, *overrides):
  path = os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_ctr.py")
  c = config_lib.load_config(path)
  c.workdir = str(tmp_path / "run")
  c.num_steps = 3
  c.noise_multiplier = 1.0
  c.target_epsilon = None
  c.log_every = 0
  c.eval_every = 0
  c.tensorboard = False
  return config_lib.apply_overrides(c, list(overrides))


def test_trainer_fields_are_checked_by_name_before_anything_is_written(tmp_path):
  with pytest.raises(UsageError, match=r"clip_groups: .*sum to at most 1"):
    config_lib.validate(_synthetic_ctr(tmp_path, "clip_groups=embed=0.9;.*=0.9"))
  with pytest.raises(UsageError, match=r"clip_stability must be"):
    config_lib.validate(_synthetic_ctr(tmp_path, "clip_stability=-1"))
  assert config_lib.validate(_synthetic_ctr(tmp_path)).clip_groups == ()
  from dpmega import train as train_lib  # pylint: disable=import-outside-toplevel
  from dpmega.tasks import build_task  # pylint: disable=import-outside-toplevel
  config = _synthetic_ctr(tmp_path, "clip_groups=no_such_layer=0.5;.*=0.5")
  with pytest.raises(UsageError, match=r"\['no_such_layer'\] match no parameter"):
    train_lib.Trainer(config_lib.validate(config), build_task(config), out=lambda s: None, config_dict=config)
  assert not (tmp_path / "run").exists()


def test_trainer_runs_with_groups_and_normalized_clipping_at_the_same_epsilon(tmp_path):
  from dpmega import train as train_lib  # pylint: disable=import-outside-toplevel
  runs, lines = {}, []
  for name, overrides in {"plain": [], "rule": ["clip_groups=embed=0.5;.*=0.5", "normalized_clipping=True"]}.items():
    config = _synthetic_ctr(tmp_path / name, *overrides)
    runs[name] = train_lib.train(config, out=lines.append)
  assert runs["rule"].epsilon == runs["plain"].epsilon  # the same sensitivity C, so the same accounting
  assert np.isfinite(runs["rule"].epsilon)
  plan = [s for s in lines if s.startswith("plan: clipping")]
  assert len(plan) == 1 and "normalized" in plan[0] and "'embed' C*0.7071" in plan[0], plan
  params = [runs[name].params for name in runs]
  assert any(not np.allclose(a, b) for a, b in zip(*map(jax.tree_util.tree_leaves, params)))


def test_a_resume_sees_a_changed_clip_rule_and_old_checkpoints_still_match_the_plain_rule(tmp_path):
  from dpmega.train import identity  # pylint: disable=import-outside-toplevel
  data = {"size": 1, "content": "x", "coverage": "all"}
  fp = lambda *o: identity.fingerprint(config_lib.validate(_synthetic_ctr(tmp_path, *o)), task_config={}, data=data,
                                       noise_multiplier=1.0)
  plain, grouped = fp(), fp("clip_groups=embed=0.5;.*=0.5")
  assert [d[0] for d in identity.differences(plain, grouped)] == ["computation.clip_rule"]
  assert [d[0] for d in identity.differences(plain, fp("normalized_clipping=True"))] == ["computation.clip_rule"]
  old = {k: dict(v) for k, v in plain.items()}
  del old["computation"]["clip_rule"]  # a checkpoint written before the clip rules
  assert identity.differences(old, plain) == []
