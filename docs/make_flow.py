"""Draws docs/flow.png: the flow of one private step (the boxes of docs/design.md's diagram).

Usage: python docs/make_flow.py [--out docs/flow.png]   (needs matplotlib: pip install -e ".[plot]")
"""

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
from matplotlib.patches import FancyBboxPatch  # noqa: E402

PRIVATE = "#fde2c8"   # reads raw private data
MECH = "#cfe3f7"      # the Gaussian mechanism and its key
RELEASED = "#d8f0d2"  # computed from released values only

# (label, detail, module, colour), top to bottom.
BOXES = [
    ("sample", "Poisson: each of N rows in with prob. q_t = B_t / N; the global sample is a pure function\n"
               "of (secret, generation, t), the same on every process; membership is secret",
     "sampling", PRIVATE),
    ("chunk", "this process's share in fixed-shape chunks [devices x k x m] + mask; padding rows masked to 0",
     "sampling.iterate_chunks", PRIVATE),
    ("clip", "per example, L2 norm over ALL params <= C (ghost / rows / vmap per parameter);\n"
             "non-finite -> 0 and counted; masked f32 sum; psum over the mesh; sum over chunks",
     "clipping, train/step (accumulate)", PRIVATE),
    ("journal", "(generation, t) fsync'd to spent.jsonl before any noisy update exists",
     "accounting/journal", RELEASED),
    ("noise", "ONCE per logical step: + N(0, (sigma_t C)^2) per coordinate (wide-tail sampler),\n"
              "key = step_key(secret, t, generation); / B_t (expected, never b_t)",
     "noise, train/step (update)", MECH),
    ("update", "optax update on the noisy mean gradient", "train/optim", RELEASED),
    ("account", "ledger (q_t, sigma_t, scheme); epsilon(delta - delta_tail) of the journal;\n"
                "stop before a step that would exceed the budget",
     "accounting/ledger, plan", RELEASED),
]


def draw(out: pathlib.Path) -> None:
  fig, ax = plt.subplots(figsize=(10, 8.2))
  ax.set_xlim(0, 10)
  ax.set_ylim(0, len(BOXES) * 1.2 + 0.4)
  ax.axis("off")
  top = len(BOXES) * 1.2
  for i, (label, detail, module, colour) in enumerate(BOXES):
    y = top - i * 1.2
    ax.add_patch(FancyBboxPatch((0.2, y - 0.85), 9.6, 0.8, boxstyle="round,pad=0.02", fc=colour, ec="#555555"))
    ax.text(0.4, y - 0.45, label, fontsize=13, fontweight="bold", va="center")
    ax.text(1.75, y - 0.45, detail, fontsize=8.6, va="center")
    ax.text(9.7, y - 0.75, module, fontsize=7.5, va="center", ha="right", style="italic", color="#333333")
    if i:
      ax.annotate("", xy=(5, y - 0.02), xytext=(5, y + 0.33), arrowprops={"arrowstyle": "->", "color": "#333333"})
  ax.text(0.2, top + 0.25, "One private step of dpmega  (orange: reads private data;  blue: the mechanism;  "
          "green: released values only)", fontsize=9.5)
  fig.savefig(out, dpi=110, bbox_inches="tight")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(pathlib.Path(__file__).with_name("flow.png")))
  draw(pathlib.Path(parser.parse_args().out))


if __name__ == "__main__":
  main()
