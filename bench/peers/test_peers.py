"""The three libraries run the same private training step (run in .venv-bench).

    . .venv-bench/bin/activate && python -m pytest -q bench/peers/test_peers.py

With identical weights (Flax copied into torch) and σ = 0, the non-private
gradients agree between JAX and torch, and the clipped mean gradients agree
between dpmega (every clipping mode), jax_privacy and Opacus (hooks and
ghost), with a clip norm that clips some examples and not others. So the
benchmark compares the cost of one computation, not of different ones.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

torch = pytest.importorskip("torch")
pytest.importorskip("opacus")
pytest.importorskip("jax_privacy")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

import config  # pylint: disable=g-import-not-at-top,wrong-import-position
import epsilon  # pylint: disable=g-import-not-at-top,wrong-import-position
import models_flax  # pylint: disable=g-import-not-at-top,wrong-import-position
import models_torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import run  # pylint: disable=g-import-not-at-top,wrong-import-position

TINY = {
    "mlp": dict(batch_size=8, microbatch_size=4, in_dim=12, hidden=(16, 16)),
    "mlm": dict(batch_size=6, microbatch_size=3, vocab_size=40, seq_len=8, d_model=16,
                num_heads=2, d_ff=32),
    "ctr": dict(batch_size=8, microbatch_size=4, table_rows=(30, 300), embed_dim=4,
                deep_hidden=(16, 8)),
}


def tiny(name):
  return dataclasses.replace(config.WORKLOADS[name], **TINY[name])


def _flax_modules(tree, path=()):
  """``(path, leaf module dict)`` in creation order (``init``'s dict order).

  Only ``params`` from ``init`` keep creation order; trees that went through
  ``jax.tree`` (gradients) have sorted keys, so they are read by path.
  """
  if all(not isinstance(v, dict) for v in tree.values()):
    yield path, tree
    return
  for k, v in tree.items():
    yield from _flax_modules(v, path + (k,))


def _torch_modules(model):
  return [m for m in model.modules() if list(m.parameters(recurse=False))]


def _torch_param(module, name):
  return module.bias if name == "bias" else module.weight


def _to_torch_layout(name, value):
  return value.T if name == "kernel" else value


def copy_flax_to_torch(params, model):
  flax_modules = list(_flax_modules(params))
  torch_modules = _torch_modules(model)
  assert len(torch_modules) == len(flax_modules)
  with torch.no_grad():
    for tm, (_, fm) in zip(torch_modules, flax_modules):
      for name, value in fm.items():
        _torch_param(tm, name).copy_(torch.from_numpy(np.array(_to_torch_layout(name, value))))


def torch_grads_as_flax(params, model):
  """Torch ``.grad``s in the order of :func:`flax_leaves`, in Flax layout."""
  return [_to_torch_layout(name, _torch_param(tm, name).grad.numpy())
          for tm, (_, fm) in zip(_torch_modules(model), _flax_modules(params))
          for name in sorted(fm)]


def flax_leaves(tree, params):
  """Leaves of ``tree`` (shaped like ``params``) in creation order, sorted names within."""
  out = []
  for path, fm in _flax_modules(params):
    node = tree
    for k in path:
      node = node[k]
    out += [np.asarray(node[name]) for name in sorted(fm)]
  return out


def setup(name, seed=0):
  w = tiny(name)
  batch_np = config.make_batch(w, seed=seed)
  batch = jax.tree.map(jnp.asarray, batch_np)
  params = models_flax.init_params(w, batch, seed=seed, jit=False)  # creation order
  return w, batch_np, batch, params


def assert_close(a, b, tol=2e-4):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=tol, atol=tol)


def clip_between(params, batch, w):
  """A clip norm between the smallest and largest per-example gradient norm."""
  per_example_loss, _ = models_flax.loss_fns(w)
  g = jax.vmap(jax.grad(per_example_loss), in_axes=(None, 0))(params, batch)
  norms = np.sqrt(sum(np.sum(np.asarray(x).reshape(w.batch_size, -1) ** 2, axis=1)
                      for x in jax.tree.leaves(g)))
  assert norms.min() < np.median(norms) < norms.max()
  return float(np.median(norms))


def torch_step_grads(w, batch_np, params, mode, clip):
  """Gradients torch/Opacus applies in one step (σ = 0), laid out like Flax params."""
  from opacus import PrivacyEngine  # pylint: disable=g-import-not-at-top
  model, criterion, inputs, targets = models_torch.build(w)
  copy_flax_to_torch(params, model)
  batch = models_torch.to_torch(batch_np)
  opt = torch.optim.SGD(model.parameters(), lr=0.0)
  if mode == "torch":
    criterion(model(*inputs(batch)), *targets(batch)).backward()
    return torch_grads_as_flax(params, model)
  loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*batch.values()),
                                       batch_size=w.batch_size)
  out = PrivacyEngine(accountant="rdp").make_private(
      module=model, optimizer=opt, criterion=criterion, data_loader=loader,
      noise_multiplier=0.0, max_grad_norm=clip, poisson_sampling=False, grad_sample_mode=mode)
  gsm, opt = out[0], out[1]
  criterion = out[2] if mode == "ghost" else criterion
  mb = w.microbatch_size
  chunks = [{k: v[i:i + mb] for k, v in batch.items()} for i in range(0, w.batch_size, mb)]
  for i, chunk in enumerate(chunks):
    opt.signal_skip_step(do_skip=i < len(chunks) - 1)
    opt.zero_grad(set_to_none=True)
    criterion(gsm(*inputs(chunk)), *targets(chunk)).backward()
    opt.step()
  return torch_grads_as_flax(params, model)


@pytest.mark.parametrize("name", ["mlp", "mlm", "ctr"])
def test_same_parameter_count_in_both_frameworks(name):
  w, _, batch, params = setup(name)
  model, *_ = models_torch.build(w)
  assert sum(p.numel() for p in model.parameters()) == sum(x.size for x in jax.tree.leaves(params))


@pytest.mark.parametrize("name", ["mlp", "mlm", "ctr"])
def test_nonprivate_gradients_match_between_jax_and_torch(name):
  w, batch_np, batch, params = setup(name)
  _, batch_loss = models_flax.loss_fns(w)
  jax_grads = flax_leaves(jax.grad(batch_loss)(params, batch), params)
  assert_close(jax_grads, torch_step_grads(w, batch_np, params, "torch", None))


@pytest.mark.parametrize("name", ["mlp", "mlm", "ctr"])
def test_clipped_mean_gradient_matches_across_libraries(name):
  import dpmega  # pylint: disable=g-import-not-at-top
  import jax_privacy  # pylint: disable=g-import-not-at-top
  w, batch_np, batch, params = setup(name)
  clip = clip_between(params, batch, w)
  per_example_loss, batch_loss = models_flax.loss_fns(w)
  ref = jax_privacy.clipped_grad(batch_loss, l2_clip_norm=clip, batch_argnums=1,
                                 microbatch_size=w.microbatch_size)(params, batch)
  ref = flax_leaves(jax.tree.map(lambda g: g / w.batch_size, ref), params)
  for mode in dpmega.clipping_modes():
    fn = dpmega.private_value_and_grad(
        per_example_loss, clip_norm=clip, noise_multiplier=0.0, expected_batch_size=w.batch_size,
        microbatch_size=w.microbatch_size, clipping=mode)
    _, grads, stats = fn(params, batch, jax.random.key(0))
    assert 0 < int(stats.num_clipped) < w.batch_size
    assert_close(flax_leaves(grads, params), ref)
  for mode in ("hooks", "ghost"):
    assert_close(torch_step_grads(w, batch_np, params, mode, clip), ref)


def test_epsilon_agrees_across_accountants_of_the_same_kind():
  rows = {}
  for lib, acc, fn in epsilon.CASES:
    if acc in ("RDP", "PLD"):
      rows[(lib, acc)] = fn()
  assert rows[("dpmega", "RDP")] == pytest.approx(rows[("Opacus", "RDP")], rel=1e-3)
  assert rows[("dpmega", "RDP")] == pytest.approx(rows[("jax_privacy", "RDP")], rel=1e-3)
  assert rows[("dpmega", "PLD")] == pytest.approx(rows[("jax_privacy", "PLD")], rel=1e-3)
  assert rows[("dpmega", "PLD")] < rows[("dpmega", "RDP")]


def test_repeat_order_rotates_and_reverses():
  impls = ["a", "b", "c"]
  orders = [run.order_for(impls, r) for r in range(3)]
  assert orders == [["a", "b", "c"], ["b", "a", "c"], ["c", "a", "b"]]
  assert {o[0] for o in orders} == set(impls)
  assert all(sorted(o) == impls for o in orders)


def test_write_section_replaces_only_its_own_section(tmp_path):
  path = tmp_path / "RESULTS.md"
  path.write_text("# Benchmark results\n\n## Other\nkeep me\n")
  run.write_section(str(path), f"{run.BEGIN}\nfirst\n{run.END}\n")
  run.write_section(str(path), f"{run.BEGIN}\nsecond\n{run.END}\n")
  text = path.read_text()
  assert "keep me" in text and "second" in text and "first" not in text
  assert text.count(run.BEGIN) == 1
