"""Issue 18's targets at the tuned long-run setting: tables and plots from ``bench/ctr_utility.py``'s runs.

``ctr_utility.py``'s batch table (``--only batch``) runs every arm at one batch size for ``--batch_epochs``
epochs over a learning-rate grid (``--batch_lr_grid``) and seeds (``--batch_seeds``), optionally with the
private recalibration (``--batch_recal``). This script reads those runs (one or more ``--json`` files) and
writes, per model:

1. the grid: AUC of the first seed of every (epochs, learning rate) of every arm;
2. the targets: each arm at its best (epochs, rate) by mean AUC over seeds, among the settings run with
   >= 3 seeds (the grid picks them; a single-seed setting counts only when an arm has no seeded one) --
   mean, sd, gap to the tuned non-private arm, NE and its gap, and for recalibrated arms the fitted (a, b) and NE before;
3. plots: AUC vs epsilon (mean +- sd, with the non-private and clipped-no-noise lines) and the
   reliability diagram of the eps-3 arm before and after its recalibration.

  python bench/ctr_tuned.py --json bench/results/ctr_tuned.json --plots bench/results
"""

from __future__ import annotations

import argparse
import json
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def runs_of(paths: list[str], model: str, batch: int) -> list[dict]:
  rows = []
  for path in paths:
    rows += json.loads(pathlib.Path(path).read_text())["runs"]
  return [r for r in rows if r.get("table") == "batch" and r["model"] == model and r["batch_size"] == batch
          and r.get("family") in (None, "recipe") and not r.get("ema_decay") and r.get("epochs")]


def arm_name(r: dict) -> str:
  if r["arm"] == "private":
    return f"eps {r['epsilon']:g}" + (" + recal" if r.get("recalibration_steps") else "")
  return {"nonprivate": "non-private", "clip_only": "clipped, no noise"}[r["arm"]]


def settings(rows: list[dict]) -> dict:
  """arm -> (epochs, lr_factor) -> [runs over seeds]."""
  out: dict = {}
  for r in rows:
    out.setdefault(arm_name(r), {}).setdefault((r["epochs"], r["lr_factor"]), []).append(r)
  return out


def best(groups: dict, min_seeds: int = 3) -> tuple[tuple, list[dict]]:
  """The (epochs, lr) of highest mean AUC among those run with >= ``min_seeds`` seeds (all, if none was)."""
  seeded = {k: g for k, g in groups.items() if len(g) >= min_seeds} or groups
  return max(seeded.items(), key=lambda kv: (np.mean([r["auc"] for r in kv[1]]), len(kv[1])))


ORDER = ["non-private", "clipped, no noise", "eps 8", "eps 8 + recal", "eps 3", "eps 3 + recal", "eps 1",
         "eps 1 + recal"]
TARGET_GAP = {8.0: 0.5, 3.0: 1.0, 1.0: 2.0}


def markdown(model: str, rows: list[dict]) -> str:
  arms = settings(rows)
  names = [a for a in ORDER if a in arms]
  grid_keys = sorted({k for a in names for k in arms[a]})
  out = [f"#### {model}: the grid (AUC, first seed)", "",
         "| arm | " + " | ".join(f"{e:g} ep x{lr:g}" for e, lr in grid_keys) + " |",
         "|---|" + "---:|" * len(grid_keys)]
  for a in names:
    cells = []
    for k in grid_keys:
      first = [r for r in arms[a].get(k, []) if not r.get("seed")]
      cells.append(f"{first[0]['auc']:.4f}" if first else "")
    out.append(f"| {a} | " + " | ".join(cells) + " |")
  ref_key, ref = best(arms["non-private"])
  ref_auc = np.mean([r["auc"] for r in ref])
  ref_ne = np.mean([r["normalized_entropy"] for r in ref])
  out += ["", f"#### {model}: each arm at its best setting (mean over seeds)", "",
          "| arm | epochs, lr | seeds | AUC mean (sd) | gap to non-private | target | NE | NE gap | target "
          "| ECE | recalibration a, b (NE before) |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
  for a in names:
    key, group = best(arms[a])
    aucs = [r["auc"] for r in group]
    ne = np.mean([r["normalized_entropy"] for r in group])
    sd = f" ({np.std(aucs, ddof=1):.4f})" if len(aucs) > 1 else ""
    gap = 100 * (ref_auc - np.mean(aucs))
    eps = group[0].get("epsilon")
    target = {None: "", **{e: f"<= {g:g}" for e, g in TARGET_GAP.items()}}.get(eps, "")
    if a == "clipped, no noise":
      target = "<= 0.3"
    recal = ""
    if group[0].get("calibration"):
      ab = np.mean([[r["calibration"]["temperature"], r["calibration"]["bias"]] for r in group], axis=0)
      before = np.mean([r["uncalibrated"]["normalized_entropy"] for r in group])
      recal = f"{ab[0]:.3f}, {ab[1]:+.3f} ({before:.4f})"
    out.append(f"| {a} | {key[0]:g}, x{key[1]:g} | {len(group)} | {np.mean(aucs):.4f}{sd} | "
               f"{'' if a == 'non-private' else f'{gap:.2f} pt'} | {target} | {ne:.4f} | "
               f"{'' if a == 'non-private' else f'{ne - ref_ne:+.4f}'} | "
               f"{'' if a == 'non-private' or eps is None else '<= 0.02'} | "
               f"{np.mean([r['ece'] for r in group]):.4f} | {recal} |")
  return "\n".join(out)


def _save(plt, fig, ax, path: pathlib.Path) -> str:
  """Legend, layout, PNG; the path as RESULTS.md names it."""
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def plots(model: str, rows: list[dict], directory: pathlib.Path) -> list[str]:
  try:
    import matplotlib  # noqa: PLC0415 - optional (the plot extra)
    import matplotlib.ticker  # noqa: PLC0415
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    return []
  arms = settings(rows)
  directory.mkdir(parents=True, exist_ok=True)
  written = []
  fig, ax = plt.subplots(figsize=(5, 3.6))
  for label, style in (("", "o-"), (" + recal", "s--")):
    points, where = [], set()
    for eps in (1.0, 3.0, 8.0):
      name = f"eps {eps:g}{label}"
      if name in arms:
        (epochs, lr), group = best(arms[name])
        aucs = [r["auc"] for r in group]
        points.append((eps, np.mean(aucs), np.std(aucs, ddof=1) if len(aucs) > 1 else 0.0))
        where.add(f"{epochs:g} epochs x{lr:g}")
    if points:
      e, m, s = zip(*points)
      ax.errorbar(e, m, yerr=s, fmt=style, capsize=3,
                  label=f"private{' + recalibration' if label else ''} ({', '.join(sorted(where))})")
  for name, color in (("non-private", "k"), ("clipped, no noise", "tab:gray")):
    if name in arms:
      _, group = best(arms[name])
      ax.axhline(np.mean([r["auc"] for r in group]), color=color, ls=":", label=name)
  ax.set_xscale("log")
  ax.set_xticks([1, 3, 8], ["1", "3", "8"])
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel("epsilon")
  ax.set_ylabel("AUC (held-out 10^5 rows)")
  ax.set_title(f"{model}: tuned, batch 16,384, mean over seeds")
  written.append(_save(plt, fig, ax, directory / f"ctr_tuned_auc_vs_epsilon_{model}.png"))
  recal = [r for r in rows if r.get("reliability_uncalibrated") and r.get("epsilon") == 3.0]
  if recal:
    r = recal[0]
    fig, ax = plt.subplots(figsize=(4.2, 4))
    for key, label, style in (("reliability_uncalibrated", "before recalibration", "o-"),
                              ("reliability", "after (private a, b)", "s-")):
      table = r[key]
      ax.plot([b["predicted"] for b in table], [b["observed"] for b in table], style, label=label)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("mean predicted (decile)")
    ax.set_ylabel("observed rate")
    ax.set_title(f"{model}, eps 3: reliability")
    written.append(_save(plt, fig, ax, directory / f"ctr_tuned_reliability_{model}.png"))
  return written


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--json", nargs="+", default=[str(ROOT / "bench" / "results" / "ctr_tuned.json")])
  p.add_argument("--models", nargs="+", default=["deepfm", "dlrm"])
  p.add_argument("--batch", type=int, default=16384)
  p.add_argument("--plots", default=str(ROOT / "bench" / "results"))
  args = p.parse_args(argv)
  for model in args.models:
    rows = runs_of(args.json, model, args.batch)
    if not rows:
      continue
    print(markdown(model, rows))
    print()
    print("Plots: " + ", ".join(f"`{x}`" for x in plots(model, rows, pathlib.Path(args.plots))))
    print()


if __name__ == "__main__":
  main()
