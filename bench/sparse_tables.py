"""Sparse vs dense DP-SGD on a DeepFM with huge tables: step time, peak memory, utility (issue 19).

Three whole training steps (gradient + ``optax.adam``), side by side, on
``bench/step_overhead.py``'s DeepFM (26 fields in one shared ``rows x 16``
table + a ``rows x 1`` wide table + MLP 416-400-200-1), Zipf-like ids:

* ``non-private``: ``jax.value_and_grad`` of the mean loss, then adam (params and state donated);
* ``dp dense``: the trainer's step (``make_private_step``: clipped sum, one
  Gaussian draw on every coordinate, adam);
* ``dp sparse``: the same clipped sum, plus the clipped row counts
  (``dpmega.sparse.make_count_fn``), then ``make_update_fn(sparse=...)``:
  private row selection, noise on the dense leaves and the selected rows only,
  lazy adam on them; one selection per table;
* ``dp sparse shared``: the same with one selection for both tables (they are
  reached by the same ids; the trainer's default for DeepFM).

``--what time``: median wall time per step over ``--reps`` interleaved rounds
(target: sparse <= 1.3x non-private at 10^6 rows, batch 1,024). ``--what
memory``: each mode in its own process at ``--rows`` (default 10^7), peak
RSS (``VmHWM``) over a few steps (target: sparse <= 1.2x non-private).
``--what utility``: sparse vs dense DP-SGD AUC at the same epsilon on
generated Criteo-format data (:mod:`dpmega.data.criteo_synthetic`), with the
update sparsity. ``--what audit``: ``dpmega audit --kind sparse``
(:func:`dpmega.audit.sparse_mechanism_audit`) at the sigma_eff the utility arms
are calibrated to (same ``--epsilon/--train_rows/--batch/--steps``) and each
``--grid`` point's (f, tau), with a sanity arm whose library noise is scaled
by 0.25 while the claim is not (it must be detected).

Usage:
  python bench/sparse_tables.py --what time --rows 1000000 --batch 1024 --reps 10
  python bench/sparse_tables.py --what memory --rows 10000000
  python bench/sparse_tables.py --what utility --epsilon 1,3,8 --grid 0.5:3,0.3:3,0.5:2.5
  python bench/sparse_tables.py --what audit --epsilon 1,3,8 --grid 0.3:2.75 --train_rows 1000000 --batch 8192 \
      --steps 250 --trials 50000
  # the issue's size: 10^6 rows, 2^20 rows per feature, ids with a long tail (hours: the dense arm is ~30 min)
  python bench/sparse_tables.py --what utility --epsilon 1 --grid 0.2:2.5:shared,0.3:3:shared --train_rows 1000000 \
      --eval_rows 100000 --batch 8192 --steps 250 --buckets 1048576 --vocab_max 1000000 --max_rows 131072
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import procmem
import step_overhead
from dpmega import noise
from dpmega import sharding
from dpmega import sparse
from dpmega.train import step as step_lib

TABLES = (("params", "table", "embedding"), ("params", "wide", "embedding"))


def deepfm(rows: int, batch: int, seed: int = 0):
  """(per-example loss, params, batch) of step_overhead's DeepFM at ``rows`` rows per table."""
  m = step_overhead.DeepFM(rows=rows)
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  u = jax.random.uniform(k1, (batch, m.fields))
  ids = jnp.minimum((rows ** u).astype(jnp.int32) - 1, rows - 1)
  data = {"ids": np.asarray(ids), "y": np.asarray(jax.random.bernoulli(k2, 0.25, (batch,)), np.float32)}

  def loss(p, ex):
    z = m.apply(p, ex["ids"])
    return jnp.maximum(z, 0) - z * ex["y"] + jnp.log1p(jnp.exp(-jnp.abs(z)))

  return loss, m.init(k3, ids[0]), data


def sparse_spec(batch: int, fields: int, *, max_rows: int, threshold_sd: float = 4.0,
                selection_fraction: float = 0.5, shared: bool = False) -> sparse.SparseTables:
  """The selection used here: tau = ``threshold_sd`` selection noise sd at sigma_eff = 1; the fast branch always.

  ``shared``: the two tables (reached by the same ids) share one selection, as the trainer's DeepFM does.
  """
  sigma1 = sparse.split_noise_multiplier(1.0, selection_fraction)[0]
  return sparse.SparseTables(TABLES, sparse.SelectionConfig(
      count_clip=1.0, threshold=threshold_sd * sigma1, selection_fraction=selection_fraction,
      max_rows=max_rows, max_touched=batch * fields), shared=(TABLES,) if shared else ())


def make_steps(mode: str, rows: int, batch: int, max_rows: int):
  """``(step(), state_ref)``: one whole training step of ``mode`` on fixed data, state kept in a closure."""
  loss, params, data = deepfm(rows, batch)
  opt = optax.adam(1e-3)
  mask = np.ones(batch, np.float32)
  if mode == "non-private":
    grad = jax.value_and_grad(lambda p, x: jnp.mean(jax.vmap(loss, (None, 0))(p, x)))

    def train(p, s, x):
      u, s = opt.update(grad(p, x)[1], s, p)
      return optax.apply_updates(p, u), s

    jitted = jax.jit(train, donate_argnums=(0, 1))
    box = {"p": params, "s": opt.init(params)}

    def step():
      box["p"], box["s"] = jitted(box["p"], box["s"], data)
      return box["p"]

    return step
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  ps = step_lib.make_private_step(loss, opt, mesh, params, clip_norm=1.0, microbatch_size=batch,
                                  max_microbatches=1)
  spec = None
  if mode.startswith("dp sparse"):
    spec = sparse_spec(batch, 26, max_rows=max_rows, shared=mode == "dp sparse shared")
  update = step_lib.make_update_fn(opt, mesh, ps.param_shardings, ps.opt_shardings, clip_norm=1.0, sparse=spec)
  table_rows = spec.selection_rows({t: rows for t in TABLES}) if spec is not None else {}  # each selection's counts
  count = sparse.make_count_fn(lambda b: [b["ids"]] * len(table_rows), table_rows, mesh, count_clip=1.0)
  box = {"state": ps.shard_state(step_lib.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params)), donate=True),
         "t": 0}
  secret = noise.insecure_secret_from_seed(0)  # a benchmark: not a private release

  def step():
    st = box["state"]
    acc = ps.accumulate.start(st.params, data, mask)  # the first (only) chunk, as the trainer does
    counts = None
    if spec is not None:
      counts = count(sparse.zero_counts(table_rows, spec.selection.max_touched), data, mask)
    box["state"], box["m"] = update(st, acc.grad_sum, noise.step_key(secret, box["t"]), 1.0, float(batch),
                                    row_counts=counts)
    box["t"] += 1
    return box["state"].params

  step.box = box
  return step


def time_modes(rows: int, batch: int, reps: int, max_rows: int) -> dict:
  steps = {m: make_steps(m, rows, batch, max_rows)
           for m in ("non-private", "dp dense", "dp sparse", "dp sparse shared")}
  for f in steps.values():
    jax.block_until_ready(f())  # compile + warm up
    jax.block_until_ready(f())
  times = collections.defaultdict(list)
  for _ in range(reps):  # interleaved: load from other processes hits every mode alike
    for m, f in steps.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      times[m].append(time.perf_counter() - t)
  base = statistics.median(times["non-private"])
  out = {}
  for m, ts in times.items():
    t = statistics.median(ts)
    out[m] = {"ms": round(t * 1e3, 2), "ratio": round(t / base, 3)}
    print(f"  {m:12s} {t * 1e3:9.1f} ms  {t / base:6.2f}x non-private  (n={len(ts)})")
  for name in ("dp sparse", "dp sparse shared"):
    m = steps[name].box["m"]
    info = {k: float(m[k]) for k in ("selected_rows", "update_sparsity", "selection_cap_hit")}
    print(f"  {name} step: {info}")
    out[f"{name} metrics"] = info
  return out


def memory_one(mode: str, rows: int, batch: int, max_rows: int, steps: int) -> dict:
  """Peak RSS of ``mode`` in this process: from before building the model to after ``steps`` steps."""
  procmem.reset_peak_rss()
  base = procmem.status_kib("VmRSS")
  f = make_steps(mode, rows, batch, max_rows)
  for _ in range(steps):
    jax.block_until_ready(f())
  return {"mode": mode, "rows": rows, "peak_mib": procmem.status_kib("VmHWM") / 1024, "start_mib": base / 1024}


def memory_modes(rows: int, batch: int, max_rows: int, steps: int, modes) -> dict:
  out = {}
  for m in modes:
    cmd = [sys.executable, __file__, "--what", "_memory_one", "--mode", m, "--rows", str(rows), "--batch",
           str(batch), "--max_rows", str(max_rows), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      out[m] = {"error": proc.stderr[-600:]}
      print(f"  {m:12s} failed: {proc.stderr[-300:]}")
      continue
    out[m] = json.loads(proc.stdout.strip().splitlines()[-1])
  base = out.get("non-private", {}).get("peak_mib")
  for m, r in out.items():
    if "peak_mib" in r:
      ratio = f"  {r['peak_mib'] / base:5.2f}x non-private" if base else ""
      print(f"  {m:12s} peak RSS {r['peak_mib']:9.1f} MiB{ratio}")
  return out


def _calibrated(epsilon: float, n: int, batch: int, steps: int) -> tuple[float, float]:
  """``(delta, sigma_eff)`` of the utility arms: delta = 1 / (10 N), RDP over ``steps`` Poisson steps at ``batch``."""
  from dpmega.accounting import calibrate  # pylint: disable=import-outside-toplevel

  delta = 1.0 / (10 * n)
  return delta, calibrate.calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta, dataset_size=n,
                                                     batch_sizes=[batch] * steps)


def audit_arms(epsilons, grid, *, train_rows: int, batch: int, steps: int, trials: int) -> dict:
  """The sparse step's audit at each epsilon's calibrated sigma_eff and each (f, tau), plus a noise-x0.25 sanity arm.

  sigma_eff is calibrated as :func:`utility` does (delta = 1 / (10 N), ``steps`` Poisson steps at ``batch``); the
  audit is of one step without subsampling (the strongest attack), whose claim is the exact epsilon of one
  Gaussian step at sigma_eff.
  """
  from dpmega import audit  # pylint: disable=import-outside-toplevel

  out = {}
  for eps in epsilons:
    delta, sigma = _calibrated(eps, train_rows, batch, steps)
    for f, tau, _ in grid:
      for arm, scale in (("honest", 1.0), ("sanity: noise x0.25", 0.25)):
        t0 = time.perf_counter()
        r = audit.sparse_mechanism_audit(noise_multiplier=sigma, selection_fraction=f, threshold=tau,
                                         delta=delta, trials=trials, seed=int(eps * 100),
                                         noise_scale_for_testing=scale)
        row = {"epsilon": eps, "sigma_eff": sigma, "f": f, "tau": tau, "arm": arm,
               "claimed": r.claimed_epsilon, "audited_lower_bound": r.epsilon_lower_bound,
               "violation": bool(r.violation), "seconds": round(time.perf_counter() - t0, 1)}
        out[f"{eps:g} f={f:g} tau={tau:g} {arm}"] = row
        verdict = ("DETECTED" if r.violation else "not detected") if scale < 1 else (
            "VIOLATION" if r.violation else "within the claim")
        print(f"  eps {eps:g} sigma_eff {sigma:.4f} f={f:g} tau={tau:g} {arm:20s} claimed {r.claimed_epsilon:.3f} "
              f"audited >= {r.epsilon_lower_bound:.3f}  {verdict}  ({row['seconds']} s)", flush=True)
  return out


def utility(epsilon: float, *, train_rows: int = 40_000, eval_rows: int = 20_000, buckets: int = 2**15,
            batch: int = 512, steps: int = 200, lr: float = 3e-3, grid=((0.5, 3.0),),
            max_rows: int = 8192, data_dir: str = "/tmp/dpmega-sparse-utility", seed: int = 0,
            vocab_max: int | None = None, dense: dict | None = None) -> dict:
  """Sparse vs dense DP-SGD (same sigma_eff, same Poisson samples) on generated Criteo-format data: AUC.

  ``grid``: the ``(selection_fraction f, threshold in units of sigma1 C1, shared)`` triples of the sparse arm,
  each trained and evaluated (the dense arm once); ``shared``: DeepFM's two tables share one selection
  (``SparseTables.shared``: each example's C1 over its 26 rows, not 52). The best AUC is reported beside the
  whole grid. ``seed``: the init, the Poisson samples and the noise (an insecure seed: a benchmark).
  ``vocab_max``: the generated features' distinct values, ``geomspace(3, vocab_max, 26)`` (default: the
  generator's, 3 to 2,000, which fill 2,000 rows of any table however large; huge tables need a long tail).
  ``dense``: the dense arm's result from an earlier call with the same settings and seed (the same samples,
  noise and init: deterministic), reused instead of rerun.
  """
  import tempfile  # pylint: disable=import-outside-toplevel
  from pathlib import Path  # pylint: disable=import-outside-toplevel

  from dpmega import metrics  # pylint: disable=import-outside-toplevel
  from dpmega.data import criteo, criteo_synthetic  # pylint: disable=import-outside-toplevel
  from dpmega.models import ctr  # pylint: disable=import-outside-toplevel

  root = Path(data_dir or tempfile.mkdtemp())
  paths = {"train": root / "train", "eval": root / "eval"}
  for i, (name, rows) in enumerate((("train", train_rows), ("eval", eval_rows))):
    if not (paths[name] / "meta.json").exists():
      root.mkdir(parents=True, exist_ok=True)
      spec = criteo_synthetic.SyntheticSpec() if vocab_max is None else criteo_synthetic.SyntheticSpec(
          vocab_sizes=tuple(int(v) for v in np.geomspace(3, vocab_max, criteo.NUM_CAT).round()))
      criteo_synthetic.generate_dataset(paths[name], rows, spec=spec, seed=0, row_seed=i)
  train = criteo.CriteoSource(paths["train"], buckets)
  evaluation = criteo.CriteoSource(paths["eval"], buckets)
  n = len(train)
  delta, sigma = _calibrated(epsilon, n, batch, steps)
  mcfg = ctr.CtrModelConfig(kind=ctr.ModelKind.DEEPFM, buckets=(buckets,) * criteo.NUM_CAT,
                            embed_dims=(8,) * criteo.NUM_CAT, mlp_dims=(64, 32))
  model = ctr.make_model(mcfg)
  ex = train.take(np.arange(2))
  params0 = model.init(jax.random.key(seed), ex["dense"][0], ex["sparse"][0])["params"]
  table_rows = {("embed", "table", "embedding"): buckets * criteo.NUM_CAT,
                ("linear", "table", "embedding"): buckets * criteo.NUM_CAT}

  def loss(p, e):
    z = model.apply({"params": p}, e["dense"], e["sparse"])
    return optax.sigmoid_binary_cross_entropy(z, e["label"])

  predict = jax.jit(lambda p, x: jax.nn.sigmoid(model.apply({"params": p}, x["dense"], x["sparse"])))
  ev = evaluation.take(np.arange(len(evaluation)))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  opt = optax.adam(lr)
  micro = 256
  out = {"epsilon": epsilon, "delta": delta, "sigma_eff": sigma, "steps": steps, "batch": batch, "train_rows": n,
         "table_rows": sum(table_rows.values()), "oracle_auc": None, "seed": seed}
  specs = {} if dense else {"dense": None}
  if dense:
    out["dense"] = dense
  tables = tuple(table_rows)
  for f, tau_sd, shared in grid:
    sigma1 = sparse.split_noise_multiplier(sigma, f)[0]
    specs[f"sparse f={f:g} tau={tau_sd:g}" + (" shared" if shared else "")] = sparse.SparseTables(
        tables, sparse.SelectionConfig(count_clip=1.0, threshold=tau_sd * sigma1, selection_fraction=f,
                                       max_rows=max_rows, max_touched=2 * batch * criteo.NUM_CAT),
        shared=(tables,) if shared else ())
  for mode, spec in specs.items():
    ps = step_lib.make_private_step(loss, opt, mesh, params0, clip_norm=1.0, microbatch_size=micro,
                                    max_microbatches=8)
    update = step_lib.make_update_fn(opt, mesh, ps.param_shardings, ps.opt_shardings, clip_norm=1.0,
                                     sparse=spec)
    selections = spec.selection_rows(table_rows) if spec is not None else table_rows
    row_ids = sparse.ctr_row_ids((buckets,) * criteo.NUM_CAT, tuple(selections))
    count = sparse.make_count_fn(row_ids, selections, mesh, count_clip=1.0)
    state = ps.shard_state(step_lib.TrainState(jnp.zeros((), jnp.int32), params0, opt.init(params0)))
    rng = np.random.default_rng(1 + 1000 * seed)  # the same Poisson samples for every mode (a benchmark)
    secret = noise.insecure_secret_from_seed(1 + 1000 * seed)
    sparsity, cap_hits, t0 = [], 0, time.perf_counter()
    for t in range(steps):
      idx = np.flatnonzero(rng.random(n) < batch / n)
      rows = max(micro, -(-len(idx) // micro) * micro)
      b = train.take(idx)
      mask = np.zeros(rows, np.float32)
      mask[:len(idx)] = 1
      b = {k: np.concatenate([v, np.zeros((rows - len(idx),) + v.shape[1:], v.dtype)]) for k, v in b.items()}
      acc = ps.accumulate.start(state.params, b, mask)
      counts = None
      if spec is not None:
        counts = count(sparse.zero_counts(selections, spec.selection.max_touched), b, mask)
      state, m = update(state, acc.grad_sum, noise.step_key(secret, t), sigma, float(batch), row_counts=counts)
      if spec is not None:
        sparsity.append(float(m["update_sparsity"]))
        cap_hits += int(float(m["selection_cap_hit"]))
    auc = metrics.auc(ev["label"], np.asarray(predict(sharding.to_host(state.params), ev)))
    out[mode] = {"auc": round(float(auc), 4), "seconds": round(time.perf_counter() - t0, 1)}
    if sparsity:
      out[mode].update(mean_update_sparsity=float(np.mean(sparsity)), cap_hits=cap_hits)
    print(f"  {mode:22s} AUC {auc:.4f}  ({out[mode]})", flush=True)
  best = max((m for m in specs if m != "dense"), key=lambda m: out[m]["auc"])
  out["best_sparse"] = best
  print(f"  epsilon {epsilon} (delta {delta:.1e}), sigma_eff {sigma:.3f}: best sparse ({best}) - dense AUC "
        f"{out[best]['auc'] - out['dense']['auc']:+.4f}", flush=True)
  return out


def _grid(text: str):
  """``f:tau[:shared],...`` -> ``((f, tau, shared), ...)``."""
  return tuple((float(g.split(":")[0]), float(g.split(":")[1]), g.split(":")[2:] == ["shared"])
               for g in text.split(","))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--what", choices=["time", "memory", "utility", "audit", "_memory_one"], default="time")
  p.add_argument("--rows", type=int, default=None)
  p.add_argument("--batch", type=int, default=1024)
  p.add_argument("--reps", type=int, default=10)
  p.add_argument("--max_rows", type=int, default=16384, help="K: rows kept per table and step at most")
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--mode", default="dp sparse")
  p.add_argument("--modes", default="non-private,dp sparse,dp sparse shared,dp dense")
  p.add_argument("--epsilon", default="3", help="utility: comma-separated epsilons, e.g. 1,3,8")
  p.add_argument("--grid", default="0.5:3", help="utility: the sparse arm's f:tau[:shared] (tau in units of "
                 "sigma1 C1; shared: the two tables share one selection), comma-separated, e.g. 0.3:3,0.3:3:shared")
  p.add_argument("--data_dir", default="/tmp/dpmega-sparse-utility", help="utility: where the generated data is "
                 "kept (reused when there; one directory per --train_rows)")
  p.add_argument("--seeds", type=int, default=1, help="utility: seeds (init, samples, noise) of every arm")
  p.add_argument("--first_seed", type=int, default=0, help="utility: run seeds first_seed .. first_seed + seeds - 1 "
                 "(more seeds for an earlier --out: merge the files)")
  p.add_argument("--train_rows", type=int, default=40_000, help="utility: generated training rows")
  p.add_argument("--buckets", type=int, default=2**15, help="utility: hashed rows per feature of each table "
                 "(the issue's size: 2**20, with --train_rows 1000000)")
  p.add_argument("--eval_rows", type=int, default=None, help="utility: generated held-out rows (default "
                 "train_rows / 4)")
  p.add_argument("--lr", type=float, default=3e-3, help="utility: Adam's learning rate (every arm)")
  p.add_argument("--dense_from", default=None, help="utility: an earlier --out JSON of the same settings whose "
                 "dense arms (same epsilon and seed) are reused rather than rerun")
  p.add_argument("--vocab_max", type=int, default=None, help="utility: generated distinct values per feature, "
                 "geomspace(3, VOCAB_MAX) (default the generator's 3 to 2,000: a long tail for huge tables)")
  p.add_argument("--trials", type=int, default=50_000, help="audit: runs per neighbouring input")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  a = p.parse_args()
  if a.what == "_memory_one":
    print(json.dumps(memory_one(a.mode, a.rows or 10**7, a.batch, a.max_rows, a.steps)))
    return
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  if a.what == "time":
    res = time_modes(a.rows or 10**6, a.batch, a.reps, a.max_rows)
  elif a.what == "memory":
    res = memory_modes(a.rows or 10**7, a.batch, a.max_rows, a.steps, a.modes.split(","))
  elif a.what == "audit":
    res = audit_arms([float(e) for e in a.epsilon.split(",")], _grid(a.grid), train_rows=a.train_rows,
                     batch=a.batch, steps=a.steps if a.steps != 3 else 200, trials=a.trials)
  else:
    grid = _grid(a.grid)
    res = {}
    earlier = {}
    if a.dense_from:
      with open(a.dense_from) as f:
        earlier = json.load(f)
    for eps in (float(e) for e in a.epsilon.split(",")):
      seeds = range(a.first_seed, a.first_seed + a.seeds)
      for seed in seeds:
        start = time.perf_counter()
        name = str(eps) if a.seeds == 1 and not a.first_seed else f"{eps:g} seed {seed}"
        dense = earlier.get(name, {}).get("dense")
        r = utility(eps, steps=a.steps if a.steps != 3 else 200, train_rows=a.train_rows,
                    eval_rows=a.eval_rows or a.train_rows // 4, batch=a.batch, grid=grid, seed=seed,
                    data_dir=a.data_dir, buckets=a.buckets, lr=a.lr, max_rows=a.max_rows,
                    vocab_max=a.vocab_max, dense=dense)
        r["wall_seconds"] = round(time.perf_counter() - start, 1)
        res[name] = r
        if a.out:  # after each run: a partial result survives a stopped run
          with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
      if a.seeds > 1:
        runs = [res[f"{eps:g} seed {s}"] for s in seeds]
        for mode in [k for k, v in runs[0].items() if isinstance(v, dict) and "auc" in v]:
          aucs = [r[mode]["auc"] for r in runs]
          gaps = [r[mode]["auc"] - r["dense"]["auc"] for r in runs]
          print(f"  epsilon {eps:g} {mode:28s} AUC mean {np.mean(aucs):.4f} sd {np.std(aucs, ddof=1):.4f}; "
                f"minus dense (same seed) {np.mean(gaps):+.4f} sd {np.std(gaps, ddof=1):.4f}", flush=True)
  if a.out:
    with open(a.out, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
