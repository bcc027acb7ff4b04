"""One SGD step per implementation, on PyTorch: plain, Opacus hooks, Opacus ghost.

Opacus is set up the documented way (``PrivacyEngine.make_private``) on a
DataLoader whose batch size is the logical batch, so its optimizer divides by
the same expected batch size as the JAX libraries. The timed step then feeds
the fixed batch in micro-batches of ``microbatch_size`` and signals Opacus to
skip the optimizer step on all but the last, as ``BatchMemoryManager`` does:
per-example gradients are clipped and accumulated per micro-batch, noise is
added once.
"""

from __future__ import annotations

import torch

import config
import models_torch


def _setup(w, batch_np):
  torch.manual_seed(0)
  model, criterion, inputs, targets = models_torch.build(w)
  batch = models_torch.to_torch(batch_np)
  return model, criterion, inputs, targets, batch


def nonprivate(w, batch_np):
  model, criterion, inputs, targets, batch = _setup(w, batch_np)
  opt = torch.optim.SGD(model.parameters(), lr=config.LEARNING_RATE)
  x, y = inputs(batch), targets(batch)

  def step():
    opt.zero_grad(set_to_none=True)
    criterion(model(*x), *y).backward()
    opt.step()

  return step, (lambda: None), model


def opacus_step(w, batch_np, grad_sample_mode):
  from opacus import PrivacyEngine  # pylint: disable=g-import-not-at-top
  model, criterion, inputs, targets, batch = _setup(w, batch_np)
  opt = torch.optim.SGD(model.parameters(), lr=config.LEARNING_RATE)
  dataset = torch.utils.data.TensorDataset(*batch.values())
  loader = torch.utils.data.DataLoader(dataset, batch_size=w.batch_size)
  engine = PrivacyEngine(accountant="rdp")
  out = engine.make_private(
      module=model, optimizer=opt, criterion=criterion, data_loader=loader,
      noise_multiplier=config.NOISE_MULTIPLIER, max_grad_norm=config.CLIP_NORM,
      poisson_sampling=False, grad_sample_mode=grad_sample_mode)
  if grad_sample_mode == "ghost":
    model, opt, criterion, _ = out
  else:
    model, opt, _ = out
  mb = w.microbatch_size
  chunks = [{k: v[i:i + mb] for k, v in batch.items()} for i in range(0, w.batch_size, mb)]

  def step():
    for i, chunk in enumerate(chunks):
      opt.signal_skip_step(do_skip=i < len(chunks) - 1)
      opt.zero_grad(set_to_none=True)
      criterion(model(*inputs(chunk)), *targets(chunk)).backward()
      opt.step()

  return step, (lambda: None), model


def build(impl: str, w, batch_np):
  """``impl``: "torch" | "opacus:hooks" | "opacus:ghost"."""
  if impl == "torch":
    return nonprivate(w, batch_np)
  if impl.startswith("opacus:"):
    return opacus_step(w, batch_np, impl.split(":", 1)[1])
  raise ValueError(f"unknown torch implementation {impl!r}")


def num_params(model) -> int:
  return sum(p.numel() for p in model.parameters())
