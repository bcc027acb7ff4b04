"""Compact embeddings under DP: mixed dimensions (Ginart et al. 2019) and MLET (Ghaemmaghami et al. 2020) vs plain.

  python bench/compact_embeddings.py [--steps 60] [--out bench/results/compact_embeddings.json]

The small ``configs/ctr_dlrm.py`` run (generated Criteo-format data, 26 tables of 1,000 rows, target epsilon 3
at delta 1e-6, Poisson sampling, "auto" clipping) with four embedding settings:

* ``plain d=16``: every table 16 wide (416,000 table parameters);
* ``mixed 16/2``: the first 3 features 16 wide, the other 23 only 2 wide, projected to 16 (94,000: 4.4x fewer);
* ``plain d=4``: every table 4 wide (104,000);
* ``MLET k=32 -> d=4``: tables trained as 1,000 x 32 times 32 x 4, collapsed to 1,000 x 4 after training
  (104,000 at inference, the size of ``plain d=4``).

Each run calibrates sigma to the same budget (so the noise differs with nothing but the model); the evaluation
AUC is exact on 10,000 held-out rows. ``--insecure_reproducible_seed`` makes the runs repeatable: a benchmark,
not a private release. About 2 minutes a run on 2 loaded CPU cores.
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
from dpmega.models import ctr  # noqa: E402

SETTINGS = {
    "plain d=16": dict(embed_dim=16),
    "mixed 16/2": dict(embed_dim=(16,) * 3 + (2,) * 23, project_to=16),
    "plain d=4": dict(embed_dim=4),
    "MLET k=32 -> d=4": dict(embed_dim=4, mlet_inner=32),
}


def run(name: str, fields: dict, steps: int, workdir: str) -> dict:
  config = runpy.run_path(str(ROOT / "configs" / "ctr_dlrm.py"))["get_config"]()
  config.num_steps = steps
  config.workdir = workdir
  config.insecure_reproducible_seed = 0
  config.log_every = 0
  config.checkpoint_every = 0
  config.eval_every = 0
  config.task.model = ml_collections.ConfigDict({**config.task.model.to_dict(), **fields})  # int -> tuple widths
  start = time.monotonic()
  result = train_lib.train(config, out=lambda line: None)
  params = result.params
  if fields.get("mlet_inner"):
    mcfg = ctr.CtrModelConfig(kind="dlrm", buckets=(1000,) * 26, embed_dims=4, num_dense=13, mlp_dims=(64, 32),
                              bottom_mlp_dims=(32,), mlet_inner=fields["mlet_inner"])
    params = ctr.collapse_mlet(mcfg, params)[1]
  tables = sum(int(np.prod(v["embedding"].shape)) for k, v in params["embed"].items() if "table" in k)
  trained = sum(int(np.prod(v.shape)) for v in _leaves(result.params["embed"]))
  return {"setting": name, "table_parameters": tables, "trained_embedding_parameters": trained,
          "noise_multiplier": result.noise_multiplier, "epsilon": result.epsilon, "steps": result.steps,
          "auc": result.eval_metrics.get("auc"), "normalized_entropy": result.eval_metrics.get("normalized_entropy"),
          "seconds": round(time.monotonic() - start, 1)}


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield np.asarray(tree)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "compact_embeddings.json"))
  args = parser.parse_args(argv)
  rows = []
  for name, fields in SETTINGS.items():
    with tempfile.TemporaryDirectory() as workdir:
      rows.append(run(name, fields, args.steps, workdir))
    print(json.dumps(rows[-1]), flush=True)
  print("\n| setting | table parameters | AUC | NE | sigma | epsilon | seconds |\n|---|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['setting']} | {r['table_parameters']:,} | {r['auc']:.4f} | {r['normalized_entropy']:.4f} | "
          f"{r['noise_multiplier']:.3f} | {r['epsilon']:.3f} | {r['seconds']:.0f} |")
  pathlib.Path(args.out).write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
