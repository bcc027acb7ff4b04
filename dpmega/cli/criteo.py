"""``dpmega criteo-convert``: Criteo TSV -> memory-mapped columns, once, streaming.

  dpmega criteo-convert --layout kaggle --root ~/data/dac --out data/criteo_kaggle
  dpmega criteo-convert --layout terabyte --root ~/data/criteo1tb --days 0 1 2 --out data/criteo_tb_0_2
  dpmega criteo-convert --files day_0.gz --out data/day0 --skip_malformed
"""

from __future__ import annotations

import argparse
import os
import zlib

from dpmega.errors import UsageError


def add_parser(subparsers) -> None:
  p = subparsers.add_parser(
      "criteo-convert", help="convert Criteo-format TSV to the memory-mapped columns the trainer reads",
      description="Read Criteo-format text (label, I1..I13, C1..C26; .gz allowed) once, streaming, and write "
      "memory-mapped columns (see dpmega.data.criteo_tsv). Malformed lines stop the conversion with the file and "
      "line, unless --skip_malformed.")
  p.add_argument("--layout", choices=["kaggle", "terabyte"], default=None,
                 help="find the files under --root: kaggle = train.txt, terabyte = day_N[.gz]")
  p.add_argument("--root", default=None, help="directory of the release (with --layout)")
  p.add_argument("--days", type=int, nargs="*", default=None, help="terabyte: which days (default: all present)")
  p.add_argument("--files", nargs="*", default=None, help="explicit input files, in order (instead of --layout)")
  p.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
  p.add_argument("--skip_malformed", action="store_true", help="skip and count malformed lines")
  p.add_argument("--max_rows", type=int, default=None, help="stop after this many rows")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  p.add_argument("--no_progress", action="store_true", help="no progress bar on stderr")
  p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
  from dpmega.data import criteo_tsv  # noqa: PLC0415 - keeps the CLI start light

  if bool(args.files) == bool(args.layout):
    raise UsageError("give either --files or --layout with --root, not both and not neither.")
  if args.layout:
    if not args.root:
      raise UsageError("--layout needs --root (the directory holding the release's files).")
    files = criteo_tsv.layout_files(args.root, args.layout, args.days)
  else:
    files = args.files
  empty = [str(f) for f in files if os.path.isfile(f) and os.path.getsize(f) == 0]
  if empty:
    raise UsageError(f"input file(s) {', '.join(empty)} are empty: nothing to convert.")
  if os.path.exists(args.out) and not args.overwrite:
    raise UsageError(f"--out {args.out} exists: pass --overwrite to replace it, or choose another --out.")
  if args.max_rows is not None and args.max_rows < 1:
    raise UsageError(f"--max_rows must be an int >= 1, got {args.max_rows}.")
  try:
    stats = criteo_tsv.convert(files, args.out, on_error="skip" if args.skip_malformed else "raise",
                           max_rows=args.max_rows, progress=not args.no_progress, overwrite=args.overwrite,
                           layout=args.layout)
  except (OSError, EOFError, zlib.error) as e:  # unwritable --out (unreadable inputs are named by convert)
    raise UsageError(f"{type(e).__name__}: {e}" + ("" if getattr(e, "filename", None) else f" (--out {args.out})")) from None
  print(f"wrote {stats.rows:,} rows to {args.out} in {stats.seconds:.1f}s"
        + (f"; skipped {stats.skipped:,} malformed line(s), first: {stats.first_skipped[0]}"
           if stats.skipped else ""))
  return 0
