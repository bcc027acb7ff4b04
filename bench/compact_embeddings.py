"""Compact embeddings under DP: mixed dimensions (Ginart et al. 2019) and MLET (Ghaemmaghami et al. 2020) vs plain.

  python bench/compact_embeddings.py [--steps 60] [--seeds 1] [--arms private] [--settings NAME ...]
                                     [--out bench/results/compact_embeddings.json] [--resume]

The small ``configs/ctr_dlrm.py`` run (generated Criteo-format data, 26 tables of 1,000 rows, target epsilon 3
at delta 1e-5, Poisson sampling, "auto" clipping) with these embedding settings:

* ``plain d=16``: every table 16 wide (416,000 table parameters);
* ``mixed 16/2``: the first 3 features 16 wide, the other 23 only 2 wide, projected to 16 (94,000: 4.4x fewer);
* ``plain d=4``: every table 4 wide (104,000);
* ``MLET k=K -> d=4`` (K in 8, 16, 32, 64): tables trained as 1,000 x K times K x 4, collapsed to 1,000 x 4 after
  training (104,000 at inference, the size of ``plain d=4``).

Arms: ``private`` (sigma calibrated to the budget for each model, so the noise differs with nothing but the
model) and ``nonprivate`` (no clipping, no noise: where the seeds' trade-off is measured in the papers). Seed
``s`` sets the initialization, the Poisson samples and the noise (``--insecure_reproducible_seed``: a
benchmark, not a private release); every setting of a seed sees the same samples. The evaluation AUC is exact on
10,000 held-out rows. ``--resume`` keeps the runs already in ``--out`` and runs only the missing ones. The
summary pairs each setting with ``plain d=16`` and ``plain d=4`` seed by seed (mean and standard error of the
difference). The config's data has a hidden model with 4-dimensional interactions among 8 features, where 4-wide
tables hold all there is to learn; ``--latent_dim K --interacting F --rows N --eval_rows M`` generate data whose
interactions are K-dimensional among F features instead (written once under ``--data_dir`` and read through the
Criteo reader, as real data is).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import runpy
import sys
import tempfile
import time

import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpmega import train as train_lib  # noqa: E402
from dpmega.data import criteo_synthetic  # noqa: E402
from dpmega.models import ctr  # noqa: E402
from dpmega.tasks import ctr as ctr_task  # noqa: E402

SETTINGS = {
    "plain d=16": dict(embed_dim=16),
    "mixed 16/2": dict(embed_dim=(16,) * 3 + (2,) * 23, project_to=16),
    "plain d=4": dict(embed_dim=4),
    **{f"MLET k={k} -> d=4": dict(embed_dim=4, mlet_inner=k) for k in (8, 16, 32, 64)},
}
ARMS = ("private", "nonprivate")


def run(name: str, arm: str, seed: int, args, workdir: str) -> dict:
  fields = SETTINGS[name]
  config = runpy.run_path(str(ROOT / "configs" / "ctr_dlrm.py"))["get_config"]()
  config.num_steps = args.steps
  config.workdir = workdir
  config.insecure_reproducible_seed = seed
  config.init_seed = seed
  config.target_epsilon = args.epsilon
  config.log_every = 0
  config.checkpoint_every = 0
  config.eval_every = 0
  config.task.model = ml_collections.ConfigDict({**config.task.model.to_dict(), **fields})  # int -> tuple widths
  if args.data:
    config.task.data.train_dir, config.task.data.eval_dir = args.data
  if arm == "nonprivate":  # no clipping (C = 1e9), no noise (sigma 1e-12), no recalibration
    config.target_epsilon, config.noise_multiplier, config.clip_norm = None, 1e-12, 1e9
    config.recalibration.steps = 0
  start = time.monotonic()
  result = train_lib.train(config, out=lambda line: None)
  params = result.params
  if fields.get("mlet_inner"):
    params = ctr.collapse_mlet(ctr_task.model_config(config.task), params)[1]
  tables = sum(int(np.prod(v["embedding"].shape)) for k, v in params["embed"].items() if "table" in k)
  trained = sum(int(np.prod(v.shape)) for v in _leaves(result.params["embed"]))
  return {"setting": name, "arm": arm, "seed": seed, "table_parameters": tables,
          "trained_embedding_parameters": trained,
          "noise_multiplier": result.noise_multiplier if arm == "private" else None,
          "epsilon": result.epsilon if arm == "private" else None, "steps": result.steps,
          "auc": result.eval_metrics.get("auc"), "normalized_entropy": result.eval_metrics.get("normalized_entropy"),
          "seconds": round(time.monotonic() - start, 1)}


def generated_data(args) -> tuple[str, str, float]:
  """Train and evaluation directories of a generated file whose hidden model has ``--latent_dim``-dimensional
  interactions among the first ``--interacting`` features (the config's own data has 4 among 8), read through
  the Criteo reader as real data is; and the oracle AUC of the held-out rows."""
  spec = criteo_synthetic.SyntheticSpec(latent_dim=args.latent_dim, num_interacting=args.interacting)
  base = pathlib.Path(args.data_dir) / f"rows{args.rows}_eval{args.eval_rows}_k{args.latent_dim}_i{args.interacting}"
  train, evaluation = base / "train", base / "eval"
  info_path = base / "oracle.json"
  if not info_path.exists():
    base.mkdir(parents=True, exist_ok=True)
    criteo_synthetic.generate_dataset(train, args.rows, spec=spec, seed=0, row_seed=0)
    info = criteo_synthetic.generate_dataset(evaluation, args.eval_rows, spec=spec, seed=0, row_seed=1)
    info_path.write_text(json.dumps({"oracle_auc": info.oracle_auc}))
  return str(train), str(evaluation), json.loads(info_path.read_text())["oracle_auc"]


def _key(r: dict) -> tuple:
  return r["setting"], r["arm"], r["seed"]


# A run whose held-out AUC is below this learned (almost) nothing beyond the base rate (NE ~0.99-1: the ReLUs died;
# every other run of this benchmark is above 0.69);
# the summary counts such runs and leaves them out of the means and the paired differences.
COLLAPSED_AUC = 0.6


def summary(rows: list[dict]) -> str:
  """Markdown: per arm and setting, AUC / NE mean (sd) over the seeds that did not collapse, and the seed-paired
  AUC difference to the plain d=16 and d=4 models (mean +- standard error, in AUC points; seeds where either
  collapsed left out)."""
  by = {_key(r): r for r in rows}
  ok = lambda r: r["auc"] >= COLLAPSED_AUC
  out = []
  for arm in ARMS:
    names = [n for n in SETTINGS if any(k[:2] == (n, arm) for k in by)]
    if not names:
      continue
    out += [f"\n{arm}:\n", "| setting | table parameters (served) | trained | seeds | collapsed | AUC mean (sd) | "
            "NE mean (sd) | vs plain d=16, AUC points | vs plain d=4, AUC points | sigma |",
            "|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for n in names:
      everything = [r for k, r in sorted(by.items()) if k[:2] == (n, arm)]
      rs = [r for r in everything if ok(r)]
      auc = np.array([r["auc"] for r in rs])
      ne = np.array([r["normalized_entropy"] for r in rs])
      sd = lambda a: f" ({a.std(ddof=1):.4f})" if len(a) > 1 else ""
      cells = []
      for ref in ("plain d=16", "plain d=4"):
        pairs = [(r, by.get((ref, arm, r["seed"]))) for r in rs]
        d = np.array([100 * (r["auc"] - q["auc"]) for r, q in pairs if q is not None and ok(q)])
        err = f" +- {d.std(ddof=1) / np.sqrt(len(d)):.2f} ({len(d)})" if len(d) > 1 else ""
        cells.append("" if n == ref or not len(d) else f"{d.mean():+.2f}{err}")
      sigma = everything[0]["noise_multiplier"]
      out.append(f"| {n} | {everything[0]['table_parameters']:,} | {everything[0]['trained_embedding_parameters']:,} | "
                 f"{len(everything)} | {len(everything) - len(rs)} | "
                 f"{auc.mean():.4f}{sd(auc)} | {ne.mean():.4f}{sd(ne)} | {cells[0]} | {cells[1]} | "
                 f"{'' if sigma is None else f'{sigma:.3f}'} |")
  return "\n".join(out)


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield np.asarray(tree)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60, help="training steps of 2,048 expected examples")
  parser.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1 per setting and arm")
  parser.add_argument("--epsilon", type=float, default=3.0, help="target epsilon of the private arm")
  parser.add_argument("--arms", nargs="+", default=["private"], choices=ARMS)
  parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
  parser.add_argument("--latent_dim", type=int, default=0, help="generate data whose hidden interactions have "
                      "this dimension (0: the config's generated data, dimension 4)")
  parser.add_argument("--interacting", type=int, default=26, help="with --latent_dim: interacting features")
  parser.add_argument("--rows", type=int, default=200_000, help="with --latent_dim: training rows")
  parser.add_argument("--eval_rows", type=int, default=20_000, help="with --latent_dim: held-out rows")
  parser.add_argument("--data_dir", default="/tmp/dpmega-compact-data")
  parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "compact_embeddings.json"))
  parser.add_argument("--resume", action="store_true", help="keep the runs already in --out (same steps, epsilon)")
  args = parser.parse_args(argv)
  args.data, oracle = None, None
  if args.latent_dim:
    *args.data, oracle = generated_data(args)
    print(f"generated data: {args.rows:,} rows, latent dimension {args.latent_dim}, {args.interacting} interacting "
          f"features; oracle AUC {oracle:.4f}", flush=True)
  header = {"steps": args.steps, "epsilon": args.epsilon, "latent_dim": args.latent_dim,
            "interacting": args.interacting if args.latent_dim else 8,
            "train_rows": args.rows if args.latent_dim else 50_000, "oracle_auc": oracle}
  out = pathlib.Path(args.out)
  rows = []
  if args.resume and out.exists():
    old = json.loads(out.read_text())
    mismatch = {k: (old.get(k), v) for k, v in header.items() if k != "oracle_auc" and old.get(k) != v}
    if mismatch:
      raise ValueError(f"--resume: {out} was run with other settings, (old, new): {mismatch}.")
    rows = [r for r in old["rows"] if "arm" in r]
  done = {_key(r) for r in rows}
  for seed in range(args.seeds):
    for arm in args.arms:
      for name in args.settings:
        if (name, arm, seed) in done:
          continue
        with tempfile.TemporaryDirectory() as workdir:
          rows.append(run(name, arm, seed, args, workdir))
        print(json.dumps(rows[-1]), flush=True)
        out.write_text(json.dumps({**header, "rows": rows}, indent=1))
  print(summary(rows))
  return 0

if __name__ == "__main__":
  sys.exit(main())
