#!/usr/bin/env bash
# Interleaved A/B of the step overhead (issue 15's speed condition): the pre-issue-15 tree (OLD) against the
# working tree (NEW), run old, new, old, new for each workload in the same minutes; prints the dp auto and
# clip-only ratios side by side (median of the two runs of each side). About 8 minutes on the quiet 2-core box.
#   mkdir -p /tmp/tree-f597161 && git archive f597161 | tar -x -C /tmp/tree-f597161   # the pre-issue-15 tree
#   bash bench/ab_step_overhead.sh   (override OLD=DIR NEW=DIR REPS_MLP=10 REPS_BERT=6 REPS_DEEPFM=4
#                                     WORKLOADS='mlp bert deepfm')
# Both trees run in this checkout's .venv; each side imports dpmega from its own tree (checked).
set -euo pipefail
OLD=${OLD:-/tmp/tree-f597161}
NEW=${NEW:-$(cd "$(dirname "$0")/.." && pwd)}
REPS_MLP=${REPS_MLP:-10}
REPS_BERT=${REPS_BERT:-6}
REPS_DEEPFM=${REPS_DEEPFM:-4}
WORKLOADS=${WORKLOADS:-mlp bert deepfm}
OUT=$(mktemp -d /tmp/ab.XXXXXX)
. "$NEW/.venv/bin/activate"
for tree in "$OLD" "$NEW"; do
  got=$(cd "$tree" && PYTHONPATH="$tree" python -c "import dpmega; print(dpmega.__file__)")
  case "$got" in "$tree"/*) ;; *) echo "dpmega under $tree resolves to $got: refusing" >&2; exit 1;; esac
done
echo "start $(date -u +%T) UTC, load: $(cut -d' ' -f1-3 /proc/loadavg)"

run() {  # run TAG SIDE ARGS...: one bench invocation from that side's tree, output to $OUT/TAG.SIDE.N
  local tag=$1 side=$2; shift 2
  local tree=$OLD; [ "$side" = new ] && tree=$NEW
  local n=$(ls "$OUT" | grep -c "^$tag\.$side\." || true)
  (cd "$tree" && PYTHONPATH="$tree" python bench/step_overhead.py --modes auto "$@" 2>/dev/null) > "$OUT/$tag.$side.$n"
}

for round in 1 2; do
  for w in $WORKLOADS; do
    case $w in
      mlp) args=(--only mlp --reps "$REPS_MLP");;
      bert) args=(--only bert --reps "$REPS_BERT");;
      deepfm) args=(--only deepfm --reps "$REPS_DEEPFM" --batch 1024 --batch 16384);;
      *) echo "unknown workload $w" >&2; exit 1;;
    esac
    run "$w" old "${args[@]}"; run "$w" new "${args[@]}"
  done
  echo "round $round done $(date -u +%T) UTC, load: $(cut -d' ' -f1-3 /proc/loadavg)"
done

python - "$OUT" <<'EOF'
import collections, glob, os, re, statistics, sys
out = sys.argv[1]
ratios = collections.defaultdict(list)  # (workload, batch, label, side) -> [ratio]
for path in sorted(glob.glob(os.path.join(out, "*.*.*"))):
  tag, side, _ = os.path.basename(path).split(".")
  batch = None
  for line in open(path):
    m = re.match(r"== (\w+): batch (\d+)", line)
    if m:
      batch = int(m.group(2))
    m = re.match(r"\s+(dp auto|clip only \(auto, no noise\))\s+([\d.]+) ms\s+([\d.]+)x", line)
    if m:
      ratios[(tag, batch, m.group(1).split(" (")[0], side)].append(float(m.group(3)))
print(f"\n{'workload':8s} {'batch':>6s} {'what':10s} {'old':>7s} {'new':>7s} {'new/old':>8s}   (median ratio to non-private)")
for (tag, batch, label) in sorted({k[:3] for k in ratios}):
  o, n = ratios.get((tag, batch, label, "old")), ratios.get((tag, batch, label, "new"))
  if not o or not n:
    continue
  o, n = statistics.median(o), statistics.median(n)
  print(f"{tag:8s} {batch:6d} {label:10s} {o:6.2f}x {n:6.2f}x {n / o:7.3f}{'  > 1.10' if n / o > 1.10 else ''}")
print(f"(raw outputs in {out})")
EOF
echo "end $(date -u +%T) UTC, load: $(cut -d' ' -f1-3 /proc/loadavg)"
