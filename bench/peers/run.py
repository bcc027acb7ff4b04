"""Side-by-side benchmark: dpmega vs jax_privacy vs Opacus (one command).

    . .venv-bench/bin/activate   # see bench/peers/README.md for the install
    python bench/peers/run.py     # ~15 min; writes bench/RESULTS.md (peers section),
                                  # bench/results/peers.json, bench/results/peers.png

Every (implementation, workload) measurement is a fresh subprocess
(``worker.py``), so its peak RSS is its own. Repeats go round all
implementations of a workload before the next repeat, and the order is rotated
(and reversed on odd repeats) so that machine drift hits all alike. A parent
watchdog kills a worker whose RSS passes ``--mem-cap-gb`` or that runs past
``--timeout``; that, or any exception in the worker, is the recorded result.
An implementation that fails on a workload is not retried in later repeats.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import config  # pylint: disable=g-import-not-at-top,wrong-import-position

BEGIN, END = "<!-- peers:begin -->", "<!-- peers:end -->"

# implementation -> (library shown in tables, framework whose non-private step is its baseline)
IMPLS = {
    "jax": ("JAX/Flax, non-private", "jax"),
    "dpmega:vmap": ("dpmega, clipping=\"vmap\"", "jax"),
    "dpmega:auto": ("dpmega, clipping=\"auto\" (ghost)", "jax"),
    "jax_privacy": ("jax_privacy 2.0 clipped_grad", "jax"),
    "torch": ("PyTorch, non-private", "torch"),
    "opacus:hooks": ("Opacus 1.6, hooks", "torch"),
    "opacus:ghost": ("Opacus 1.6, ghost clipping", "torch"),
}
BASELINE = {"jax": "jax", "torch": "torch"}


def dpmega_modes() -> tuple[list[str], str]:
  """The dpmega clipping modes to measure and the default of private_value_and_grad."""
  import inspect  # pylint: disable=g-import-not-at-top
  import dpmega  # pylint: disable=g-import-not-at-top
  default = inspect.signature(dpmega.private_value_and_grad).parameters["clipping"].default
  modes = [m for m in ("vmap", "auto") if m in dpmega.clipping_modes()]
  return modes, default


def run_worker(cmd: list[str], mem_cap_mb: float, timeout: float, env: dict) -> dict:
  """Runs one worker under the RSS watchdog; returns its JSON or the failure."""
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, cwd=HERE)
  ps = psutil.Process(proc.pid)
  start, peak, failure = time.monotonic(), 0.0, None
  while proc.poll() is None:
    try:
      rss = ps.memory_info().rss / 2**20
    except psutil.Error:
      rss = 0.0
    peak = max(peak, rss)
    if rss > mem_cap_mb:
      failure = (f"out of memory: RSS passed the {mem_cap_mb / 1024:.1f} GiB cap "
                 f"({rss / 1024:.1f} GiB when killed)")
    elif time.monotonic() - start > timeout:
      failure = f"timeout: still running after {timeout:.0f} s"
    if failure:
      proc.kill()
      break
    time.sleep(0.05)
  out, err = proc.communicate()
  if failure:
    return {"error": failure, "peak_rss_mb": peak}
  for line in out.splitlines():
    if line.startswith("@@RESULT@@ "):
      return json.loads(line[len("@@RESULT@@ "):])
  tail = (err or out).strip().splitlines()[-1:] or ["no output"]
  return {"error": f"worker exited with code {proc.returncode}: {tail[0][:300]}", "peak_rss_mb": peak}


def order_for(impls: list[str], repeat: int) -> list[str]:
  """Repeat r: reversed when r is odd, then rotated by r (a new leader each repeat)."""
  base = impls[::-1] if repeat % 2 else list(impls)
  k = repeat % len(impls)
  return base[k:] + base[:k]


def measure_all(args, impls: list[str], env: dict) -> dict:
  results: dict[str, dict[str, list[dict]]] = {w: {i: [] for i in impls} for w in args.workloads}
  failed: dict[tuple[str, str], dict] = {}
  t0 = time.monotonic()
  for r in range(args.repeats):
    for w in args.workloads:
      for impl in order_for(impls, r):
        if (w, impl) in failed:
          continue
        cmd = [sys.executable, os.path.join(HERE, "worker.py"), "--impl", impl, "--workload", w,
               "--warmup", str(args.warmup), "--min-time", str(args.min_time),
               "--min-steps", str(args.min_steps), "--max-time", str(args.max_time),
               "--threads", str(args.threads)]
        res = run_worker(cmd, args.mem_cap_gb * 1024, args.timeout, env)
        res["repeat"] = r
        results[w][impl].append(res)
        if "error" in res:
          failed[(w, impl)] = res
        msg = res.get("error") or f"{res['examples_per_s']:9.1f} ex/s  peak {res['peak_rss_mb']:7.0f} MB"
        print(f"[{time.monotonic() - t0:6.0f}s] r{r} {w:4s} {impl:13s} {msg}", flush=True)
  return results


def summarize(results: dict, impls: list[str]) -> dict:
  summary: dict[str, dict[str, dict]] = {}
  for w, by_impl in results.items():
    summary[w] = {}
    for impl in impls:
      runs = by_impl[impl]
      ok = [x for x in runs if "error" not in x]
      errs = [x for x in runs if "error" in x]
      if errs:
        summary[w][impl] = {"error": errs[0]["error"], "peak_rss_mb": errs[0].get("peak_rss_mb")}
      elif ok:
        summary[w][impl] = {
            "examples_per_s": statistics.median(x["examples_per_s"] for x in ok),
            "peak_rss_mb": statistics.median(x["peak_rss_mb"] for x in ok),
            "rss_setup_mb": statistics.median(x["rss_setup_mb"] for x in ok),
            "timed_peak_rss_mb": statistics.median(x["timed_peak_rss_mb"] for x in ok),
            "num_params": ok[0]["num_params"], "repeats": len(ok),
            "all_examples_per_s": [round(x["examples_per_s"], 2) for x in ok]}
    for impl in impls:
      s = summary[w].get(impl)
      base = summary[w].get(BASELINE[IMPLS[impl][1]])
      if s and "error" not in s and base and "error" not in base:
        s["ratio_to_nonprivate"] = s["examples_per_s"] / base["examples_per_s"]
  return summary


def _fmt(x, digits=1):
  return "—" if x is None else f"{x:,.{digits}f}"


def _label(impl: str, default: str) -> str:
  return IMPLS[impl][0] + (" — default" if impl == f"dpmega:{default}" else "")


def _load_line(meta: dict) -> str:
  """Says whether other jobs shared the machine: a 1-minute load average above the core count."""
  busiest = max(float(meta[k].split(",")[0]) for k in ("load_before", "load_after"))
  if busiest <= (os.cpu_count() or 1):
    return (f"Quiet machine: 1-minute load average {meta['load_before']} before, "
            f"{meta['load_after']} after (no other jobs).")
  return ("**This ran on a shared machine while other jobs ran (load average "
          f"{meta['load_before']} before, {meta['load_after']} after): absolute numbers are noisy, "
          "ratios within one library less so; the repeats column shows the spread.** Rerun on a "
          "quiet machine before quoting.")


def markdown(summary: dict, eps: dict | None, meta: dict, impls: list[str]) -> str:
  lines = [BEGIN, "## Peers: dpmega vs jax_privacy vs Opacus (`bench/peers/run.py`)", ""]
  lines += [
      f"Run {meta['date']} on {meta['machine']}. Command: `{meta['command']}` "
      f"({meta['wall_min']:.1f} min). Method: `bench/peers/README.md`. "
      f"{meta['repeats']} repeats, median shown; {meta['warmup']} warm-up step(s) "
      f"(compilation included) untimed; then steps timed for at least {meta['min_time']} s and "
      f"{meta['min_steps']} steps; {meta['threads']} threads for each library. Clip norm "
      f"{config.CLIP_NORM}, σ = {config.NOISE_MULTIPLIER}, plain SGD. "
      f"dpmega's default `clipping` is `{meta['dpmega_default']!r}`.",
      "",
      "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
      "",
      _load_line(meta),
      ""]
  for w, by_impl in summary.items():
    wl = config.WORKLOADS[w]
    lines += [f"### {w}: {wl.describe()}", "",
              f"Batch {wl.batch_size}, micro-batch {wl.microbatch_size} (private steps), "
              f"{_fmt(next((s['num_params'] for s in by_impl.values() if 'num_params' in s), None), 0)} "
              "parameters.", "",
              "| implementation | examples/s (median) | each repeat | private / non-private "
              "| peak RSS, timed steps (MB) | peak RSS, whole process (MB) | RSS after setup (MB) |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for impl in impls:
      s = by_impl.get(impl)
      if s is None:
        continue
      if "error" in s:
        lines.append(f"| {_label(impl, meta['dpmega_default'])} | **could not run**: {s['error']} | — | — | — | "
                     f"{_fmt(s.get('peak_rss_mb'), 0)} | — |")
      else:
        ratio = s.get("ratio_to_nonprivate")
        each = ", ".join(f"{x:,.0f}" if x >= 100 else f"{x:.1f}" for x in s["all_examples_per_s"])
        lines.append(f"| {_label(impl, meta['dpmega_default'])} | {_fmt(s['examples_per_s'])} | {each} | "
                     f"{'baseline' if impl in BASELINE else (_fmt(ratio, 3) + '×' if ratio else '—')} | "
                     f"{_fmt(s['timed_peak_rss_mb'], 0)} | {_fmt(s['peak_rss_mb'], 0)} | "
                     f"{_fmt(s['rss_setup_mb'], 0)} |")
    lines.append("")
  if any(s.get("ratio_to_nonprivate", 0) > 1 for by in summary.values() for s in by.values()):
    lines += ["A ratio above 1 means the private step (run in micro-batches) beat its framework's "
              "non-private step (whole batch at once). On `mlm`, XLA:CPU runs the full-batch (32) "
              "backward of this encoder several times slower than the same gradient in 4 chunks of "
              "8 (measured 377 ms vs 80 ms on this machine; `bench/peers/README.md`, Caveats): "
              "the JAX baseline there is pessimistic, not privacy free.", ""]
  lines += _where_slower(summary, meta["dpmega_default"])
  if eps:
    sch = eps["schedule"]
    lines += ["### ε for the same schedule", "",
              f"N = {sch['dataset_size']:,}, expected batch {sch['batch_size']}, σ = "
              f"{sch['noise_multiplier']}, {sch['epochs']} epochs = {sch['steps']:,} steps, "
              f"{sch['sampling']} sampling, δ = {sch['delta']}, add/remove-one neighbours.", "",
              "| library | accountant | ε | seconds |", "|---|---|---:|---:|"]
    for row in eps["rows"]:
      if "error" in row:
        lines.append(f"| {row['library']} | {row['accountant']} | error: {row['error']} | — |")
      else:
        lines.append(f"| {row['library']} | {row['accountant']} | {row['epsilon']:.4f} | "
                     f"{row['seconds']:.2f} |")
    lines.append("")
  lines += ["![peers chart](results/peers.png)", "", END]
  return "\n".join(lines) + "\n"


def _where_slower(summary: dict, default: str) -> list[str]:
  """Plain statements of every place a peer beats a dpmega mode (speed, overhead, memory)."""
  out = ["### Where dpmega is slower (or heavier)", ""]
  peers = ("jax_privacy", "opacus:hooks", "opacus:ghost")
  for w, by_impl in summary.items():
    ran = {k: v for k, v in by_impl.items() if "error" not in v}
    for mode in [k for k in by_impl if k.startswith("dpmega")]:
      label = _label(mode, default)
      if mode not in ran:
        out.append(f"- **{w}**: {label} could not run ({by_impl[mode]['error']}).")
        continue
      ours = ran[mode]
      for peer in (p for p in peers if p in ran):
        theirs = ran[peer]
        if theirs["examples_per_s"] > ours["examples_per_s"]:
          out.append(f"- **{w}**, speed: {IMPLS[peer][0]} runs "
                     f"{theirs['examples_per_s'] / ours['examples_per_s']:.2f}× the examples/s of {label}.")
        elif theirs.get("ratio_to_nonprivate", 0) > ours.get("ratio_to_nonprivate", float("inf")):
          out.append(f"- **{w}**, overhead: {label} is faster, but its private step keeps a smaller "
                     f"share of its framework's non-private speed ({ours['ratio_to_nonprivate']:.3f}) "
                     f"than {IMPLS[peer][0]} does ({theirs['ratio_to_nonprivate']:.3f}).")
        ours_step = ours["timed_peak_rss_mb"] - ours["rss_setup_mb"]
        theirs_step = theirs["timed_peak_rss_mb"] - theirs["rss_setup_mb"]
        if theirs_step < 0.9 * ours_step and ours_step > 20:
          out.append(f"- **{w}**, memory: during the timed steps {label} peaks {ours_step:.0f} MB "
                     f"above its RSS after setup, {IMPLS[peer][0]} {theirs_step:.0f} MB (peaks "
                     f"{ours['timed_peak_rss_mb']:.0f} vs {theirs['timed_peak_rss_mb']:.0f} MB).")
  if len(out) == 2:
    out.append("- Nowhere in this run.")
  return out + [""]


def chart(summary: dict, impls: list[str], path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  workloads = list(summary)
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
  width = 0.8 / len(impls)
  colors = plt.get_cmap("tab10")
  for ax, key, label in ((axes[0], "examples_per_s", "examples/s (log)"),
                         (axes[1], "timed_peak_rss_mb", "peak RSS during timed steps, MB (log)")):
    for j, impl in enumerate(impls):
      xs, ys, fails = [], [], []
      for i, w in enumerate(workloads):
        s = summary[w].get(impl)
        x = i + (j - (len(impls) - 1) / 2) * width
        if s is None:
          continue
        if "error" in s:
          fails.append(x)
        else:
          xs.append(x)
          ys.append(s[key])
      ax.bar(xs, ys, width, label=IMPLS[impl][0], color=colors(j))
      for x in fails:
        ax.text(x, 0.02, "✗", ha="center", va="bottom", color=colors(j), fontsize=11,
                transform=ax.get_xaxis_transform())
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel(label)
  axes[0].set_title("Training-step throughput (✗ = could not run)")
  axes[1].set_title("Peak resident memory during the timed steps")
  axes[1].legend(fontsize=7, loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_section(path: str, section: str) -> None:
  text = open(path).read() if os.path.exists(path) else "# Benchmark results\n\n"
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    text = head + section.rstrip("\n") + rest.split(END, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + section
  with open(path, "w") as f:
    f.write(text)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--workloads", nargs="+", default=list(config.WORKLOADS), choices=list(config.WORKLOADS))
  p.add_argument("--impls", nargs="+", default=None, help="default: all available")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--min-time", type=float, default=1.5)
  p.add_argument("--min-steps", type=int, default=2)
  p.add_argument("--max-time", type=float, default=20.0)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--mem-cap-gb", type=float, default=6.0)
  p.add_argument("--timeout", type=float, default=150.0)
  p.add_argument("--no-epsilon", action="store_true")
  p.add_argument("--results-md", default=os.path.join(ROOT, "bench", "RESULTS.md"))
  p.add_argument("--json", default=os.path.join(ROOT, "bench", "results", "peers.json"))
  p.add_argument("--png", default=os.path.join(ROOT, "bench", "results", "peers.png"))
  p.add_argument("--render-only", action="store_true",
                 help="measure nothing: rewrite the markdown section and chart from --json")
  a = p.parse_args(argv)

  if a.render_only:
    with open(a.json) as f:
      saved = json.load(f)
    impls = [i for i in IMPLS if any(i in by for by in saved["runs"].values())]
    summary = summarize(saved["runs"], impls)
    write_section(a.results_md, markdown(summary, saved["epsilon"], saved["meta"], impls))
    chart(summary, impls, a.png)
    return 0

  modes, default = dpmega_modes()
  impls = a.impls or ["jax", *[f"dpmega:{m}" for m in modes], "jax_privacy",
                      "torch", "opacus:hooks", "opacus:ghost"]
  unknown = [i for i in impls if i not in IMPLS]
  if unknown:
    p.error(f"--impls must be among {sorted(IMPLS)}, got {unknown}")
  env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
             TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu",
             # libgomp's default spin-waiting makes torch ~10x slower on a busy machine.
             OMP_WAIT_POLICY="PASSIVE")
  load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  t0 = time.monotonic()
  results = measure_all(a, impls, env)
  eps = None
  if not a.no_epsilon:
    out = subprocess.run([sys.executable, os.path.join(HERE, "epsilon.py")], capture_output=True,
                         text=True, env=env, cwd=HERE, check=False).stdout
    eps = next((json.loads(l[len("@@EPSILON@@ "):]) for l in out.splitlines()
                if l.startswith("@@EPSILON@@ ")), None)
  summary = summarize(results, impls)
  meta = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, CPU only",
      "command": "python bench/peers/run.py" + ("" if argv is None and len(sys.argv) == 1
                                                else " " + " ".join(argv if argv is not None else sys.argv[1:])),
      "wall_min": (time.monotonic() - t0) / 60, "repeats": a.repeats, "warmup": a.warmup,
      "min_time": a.min_time, "min_steps": a.min_steps, "threads": a.threads,
      "dpmega_default": default, "load_before": load_before,
      "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
      "versions": _versions()}
  with open(a.json, "w") as f:
    json.dump({"meta": meta, "summary": summary, "runs": results, "epsilon": eps}, f, indent=1)
  section = markdown(summary, eps, meta, impls)
  write_section(a.results_md, section)
  chart(summary, impls, a.png)
  print(section)
  return 0


def _versions() -> dict:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {}
  for name in ("dpmega", "jax", "jaxlib", "flax", "optax", "jax-privacy", "torch", "opacus"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = None
  return out


if __name__ == "__main__":
  sys.exit(main())
