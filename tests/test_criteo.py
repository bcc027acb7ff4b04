"""Criteo TSV reader and converter (dpmega/data/criteo_tsv.py), the column store and random-access source
(dpmega/data/criteo.py), and the generator (criteo_synthetic.py)."""

import gzip

import numpy as np
import pytest

from dpmega.data import criteo
from dpmega.data import criteo_tsv
from dpmega.data import criteo_synthetic
from dpmega.data.sources import RandomAccessSource
from dpmega.errors import UsageError


def make_line(label="1", ints=None, cats=None):
  ints = [str(i) for i in range(13)] if ints is None else ints
  cats = [f"{i:08x}" for i in range(26)] if cats is None else cats
  return "\t".join([label] + list(ints) + list(cats))


def write(path, lines, newline="\n"):
  path.write_bytes("".join(line + newline for line in lines).encode())
  return path


def test_roundtrip_values_missing_fields_and_hashes(tmp_path):
  ints = ["5", "", "-2", "0", "2147483647"] + ["7"] * 8
  cats = ["68fd1e64", ""] + ["abc"] * 23 + [""]  # last field empty: the line ends in a tab
  lines = [make_line("0", ints, cats), make_line("1")]
  src_path = write(tmp_path / "train.txt", lines)
  assert (src_path.read_bytes().split(b"\n")[0]).endswith(b"\t")
  stats = criteo_tsv.convert(src_path, tmp_path / "out", progress=False)
  assert (stats.rows, stats.skipped) == (2, 0)
  cols = criteo.open_columns(tmp_path / "out")
  assert cols.labels.tolist() == [0, 1]
  assert cols.ints[0, :5].tolist() == [5, criteo.INT_MISSING, -2, 0, 2147483647]
  assert cols.ints[1].tolist() == list(range(13))
  expected = criteo.fnv1a32(np.array([c.encode() for c in cats]))
  assert cols.cats[0].tolist() == expected.tolist()
  assert cols.cats[0, 1] == cols.cats[0, 25] == criteo.fnv1a32(np.array([b""]))[0]

  src = criteo.CriteoSource(tmp_path / "out", buckets=[2**32] * 26)
  assert isinstance(src, RandomAccessSource) and len(src) == 2
  ex = src.take(np.array([0]))
  assert ex["dense"].dtype == np.float32 and ex["sparse"].dtype == np.int32 and ex["label"].dtype == np.float32
  # log1p(max(x, 0)); missing and negative -> 0.
  np.testing.assert_allclose(ex["dense"][0, :5], np.log1p([5, 0, 0, 0, 2147483647]).astype(np.float32))


def test_crlf_line_endings_and_whitespace_are_not_stripped_as_fields(tmp_path):
  cats = ["aa"] * 25 + [""]
  path = write(tmp_path / "t.txt", [make_line("1", cats=cats)] * 3, newline="\r\n")
  criteo_tsv.convert(path, tmp_path / "out", progress=False)
  cols = criteo.open_columns(tmp_path / "out")
  assert len(cols) == 3
  assert cols.cats[0, 25] == criteo.fnv1a32(np.array([b""]))[0]  # not b"\r"


@pytest.mark.parametrize("bad_line, reason", [
    (make_line()[:-9], "expected 40 tab-separated fields"),  # 39 fields: a dropped column
    (make_line() + "\textra", "expected 40 tab-separated fields"),
    ("\t".join(make_line().split("\t")[1:]), "unlabelled test line"),
    (make_line(label="2"), "label"),
    (make_line(ints=["1"] * 12 + ["68fd1e64"]), "I13"),  # a categorical shifted into an integer column
    (make_line(ints=["1.5"] + ["1"] * 12), "I1"),
    (make_line(ints=["1"] * 5 + ["99999999999"] + ["1"] * 7), "I6"),
    ("", "expected 40"),
])
def test_malformed_line_raises_naming_file_and_line(tmp_path, bad_line, reason):
  good = make_line()
  path = write(tmp_path / "day_0", [good] * 4 + [bad_line] + [good] * 3)
  with pytest.raises(criteo_tsv.CriteoFormatError, match=reason) as e:
    criteo_tsv.convert(path, tmp_path / "out", progress=False, chunk_rows=3)
  assert e.value.line_number == 5 and e.value.path == str(path)
  assert f"{path}:5:" in str(e.value)
  assert isinstance(e.value, UsageError)
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_skip_counts_malformed_lines_and_never_shifts_columns(tmp_path):
  rows = [make_line(str(i % 2), ints=[str(i)] * 13, cats=[f"{i:08x}"] * 26) for i in range(10)]
  rows[3] = make_line()[:-9]  # dropped column
  rows[7] = make_line(label="x")
  path = write(tmp_path / "t.txt", rows)
  stats = criteo_tsv.convert(path, tmp_path / "out", progress=False, on_error="skip", chunk_rows=4)
  assert (stats.rows, stats.skipped) == (8, 2)
  assert stats.first_skipped[0].startswith(f"{path}:4:") and stats.first_skipped[1].startswith(f"{path}:8:")
  cols = criteo.open_columns(tmp_path / "out")
  kept = [0, 1, 2, 4, 5, 6, 8, 9]
  assert cols.ints[:, 0].tolist() == kept
  assert cols.ints.tolist() == [[i] * 13 for i in kept]
  assert cols.cats.tolist() == [[int(criteo.fnv1a32(np.array([f"{i:08x}".encode()]))[0])] * 26 for i in kept]
  assert cols.labels.tolist() == [i % 2 for i in kept]
  assert cols.meta["skipped"] == 2


def test_multiple_files_gzip_terabyte_layout_and_line_numbers(tmp_path):
  write(tmp_path / "day_1", [make_line("0")] * 2)
  with gzip.open(tmp_path / "day_0.gz", "wt") as f:
    f.write("".join(make_line("1") + "\n" for _ in range(3)))
  files = criteo_tsv.layout_files(tmp_path, "terabyte")
  assert [p.name for p in files] == ["day_0.gz", "day_1"]
  stats = criteo_tsv.convert(files, tmp_path / "out", progress=False, layout="terabyte")
  cols = criteo.open_columns(tmp_path / "out")
  assert stats.rows == 5 and cols.labels.tolist() == [1, 1, 1, 0, 0] and cols.meta["layout"] == "terabyte"
  # Line numbers restart per file and name the file.
  write(tmp_path / "day_2", [make_line()] + ["oops"])
  with pytest.raises(criteo_tsv.CriteoFormatError, match="day_2:2:"):
    criteo_tsv.convert(criteo_tsv.layout_files(tmp_path, "terabyte"), tmp_path / "out2", progress=False)
  with pytest.raises(UsageError, match="day file"):
    criteo_tsv.layout_files(tmp_path, "terabyte", days=[5])
  with pytest.raises(UsageError, match="train.txt"):
    criteo_tsv.layout_files(tmp_path, "kaggle")


def test_convert_refuses_to_overwrite_and_checks_arguments(tmp_path):
  path = write(tmp_path / "t.txt", [make_line()] * 5)
  criteo_tsv.convert(path, tmp_path / "out", progress=False)
  with pytest.raises(UsageError, match="exists"):
    criteo_tsv.convert(path, tmp_path / "out", progress=False)
  assert criteo_tsv.convert(path, tmp_path / "out", progress=False, overwrite=True, max_rows=2).rows == 2
  assert len(criteo.open_columns(tmp_path / "out")) == 2
  with pytest.raises(UsageError, match="chunk_rows"):
    criteo_tsv.convert(path, tmp_path / "o2", chunk_rows=0)
  with pytest.raises(UsageError, match="not a file"):
    criteo_tsv.convert(tmp_path / "missing.txt", tmp_path / "o3")
  (tmp_path / "out" / "cat.bin").write_bytes(b"\0" * 8)  # truncated
  with pytest.raises(UsageError, match="cat.bin"):
    criteo.open_columns(tmp_path / "out")
  with pytest.raises(UsageError, match="meta.json"):
    criteo.open_columns(tmp_path)


def test_hashing_is_stable_and_buckets_in_range():
  assert int(criteo.fnv1a32(np.array([b"a"]))[0]) == 0xE40C292C  # the FNV-1a reference value
  # Padding width does not change the hash.
  assert criteo.fnv1a32(np.array([b"ab", b"abcdefgh"]))[0] == criteo.fnv1a32(np.array([b"ab"]))[0]
  h = np.arange(1000, dtype=np.uint32).reshape(-1, 1).repeat(26, axis=1)
  buckets = [7] * 13 + [1000] * 13
  ids = criteo.bucketize(h, buckets)
  assert ids.dtype == np.int32 and ids.min() >= 0
  assert ids[:, :13].max() < 7 and ids[:, 13:].max() < 1000
  # Equal raw values in two features land in unrelated buckets.
  assert np.mean(ids[:, 13] == ids[:, 14]) < 0.01
  # Golden values: a change here silently invalidates every trained model's tables.
  assert criteo.bucketize(np.array([[0, 1, 2**32 - 1] + [0] * 23], np.uint32), [1000] * 26)[0, :3].tolist() == \
      GOLDEN_BUCKETS


GOLDEN_BUCKETS = [854, 336, 474]  # recorded when the format was fixed (FORMAT_VERSION 1)


def test_source_ranges_and_random_access(tmp_path):
  rows = [make_line(str(i % 2), ints=[str(i)] * 13) for i in range(20)]
  criteo_tsv.convert(write(tmp_path / "t.txt", rows), tmp_path / "out", progress=False)
  train = criteo.CriteoSource(tmp_path / "out", 100, stop=15)
  evaluation = criteo.CriteoSource(tmp_path / "out", 100, start=15)
  assert len(train) == 15 and len(evaluation) == 5
  got = train.take(np.array([14, 0, 14]))  # any order, repeats
  np.testing.assert_allclose(got["dense"][:, 0], np.log1p([14, 0, 14]))
  np.testing.assert_allclose(evaluation.take(np.array([0]))["dense"][0, 0], np.log1p(15))
  assert evaluation.labels().tolist() == [1, 0, 1, 0, 1]
  with pytest.raises(IndexError, match=r"\[0, 15\)"):
    train.take(np.array([15]))
  with pytest.raises(ValueError, match="start and stop"):
    criteo.CriteoSource(tmp_path / "out", 100, start=10, stop=30)
  with pytest.raises(ValueError, match="buckets must be"):
    criteo.CriteoSource(tmp_path / "out", [10] * 25)
  with pytest.raises(ValueError, match="buckets must be ints in"):
    criteo.CriteoSource(tmp_path / "out", 0)
  batches = list(criteo.iter_batches(train, 4))
  assert [len(b["label"]) for b in batches] == [4, 4, 4, 3]


def test_generator_output_reads_back_with_the_reader(tmp_path):
  spec = criteo_synthetic.small_spec(8)
  info = criteo_synthetic.write_synthetic_criteo(tmp_path / "g.tsv.gz", 3000, spec=spec, seed=1)
  stats = criteo_tsv.convert(tmp_path / "g.tsv.gz", tmp_path / "g", progress=False)
  cols = criteo.open_columns(tmp_path / "g")
  assert stats.rows == info.rows == 3000 and stats.skipped == 0
  assert cols.labels.mean() == pytest.approx(info.positive_rate)
  assert 0.15 < info.positive_rate < 0.35
  assert info.oracle_auc > 0.75  # labels depend strongly on the features
  assert np.any(cols.ints == criteo.INT_MISSING) and np.any((cols.ints < 0) & (cols.ints != criteo.INT_MISSING))
  assert len(np.unique(cols.cats[:, 0])) <= 9  # 8 values + missing
  # Same seed -> same hidden model; another row_seed -> a fresh sample of it.
  again = criteo_synthetic.write_synthetic_criteo(tmp_path / "h.tsv", 3000, spec=spec, seed=1)
  assert again.positive_rate == info.positive_rate
  assert gzip.open(tmp_path / "g.tsv.gz").read() == (tmp_path / "h.tsv").read_bytes()
  other = criteo_synthetic.write_synthetic_criteo(tmp_path / "i.tsv", 3000, spec=spec, seed=1, row_seed=9)
  assert other.positive_rate != info.positive_rate
  with pytest.raises(ValueError, match="vocab_sizes"):
    criteo_synthetic.SyntheticSpec(vocab_sizes=(3,) * 5)
  with pytest.raises(ValueError, match="num_rows"):
    criteo_synthetic.write_synthetic_criteo(tmp_path / "j.tsv", 0)


def test_cli_convert_and_malformed_line_exit_code(tmp_path, capsys):
  from dpmega import cli  # noqa: PLC0415

  good = write(tmp_path / "train.txt", [make_line()] * 3)
  assert cli.main(["criteo-convert", "--layout", "kaggle", "--root", str(tmp_path), "--out",
                   str(tmp_path / "cols"), "--no_progress"]) == 0
  assert "wrote 3 rows" in capsys.readouterr().out
  assert len(criteo.open_columns(tmp_path / "cols")) == 3
  bad = write(tmp_path / "bad.txt", [make_line(), make_line(label="7")])
  assert cli.main(["criteo-convert", "--files", str(bad), "--out", str(tmp_path / "b"), "--no_progress"]) == 2
  assert f"{bad}:2: label" in capsys.readouterr().err
  assert cli.main(["criteo-convert", "--files", str(bad), str(good), "--out", str(tmp_path / "b"),
                   "--no_progress", "--skip_malformed"]) == 0
  assert "skipped 1 malformed line(s), first: " in capsys.readouterr().out
  assert cli.main(["criteo-convert", "--out", str(tmp_path / "c")]) == 2


# --------------------------------------------- issue 21, item 12: what the operator sees


def _convert_cli(*argv):
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  return subprocess.run([sys.executable, "-m", "dpmega", "criteo-convert", "--no_progress", *argv],
                        capture_output=True, text=True, env=env, timeout=120, check=False)


def test_all_lines_malformed_with_skip_is_an_error_and_writes_nothing(tmp_path):
  bad = write(tmp_path / "bad.txt", ["label\tI1\tI2", make_line(label="7"), make_line()[:-9]])
  proc = _convert_cli("--files", str(bad), "--out", str(tmp_path / "out"), "--skip_malformed")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "no rows to write: all 3 line(s)" in proc.stderr and str(bad) in proc.stderr
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_truncated_gzip_is_named_with_its_last_good_line(tmp_path):
  body = gzip.compress(("".join(make_line() + "\n" for _ in range(2000))).encode())
  (tmp_path / "day_0.gz").write_bytes(body[:len(body) // 2])
  proc = _convert_cli("--files", str(tmp_path / "day_0.gz"), "--out", str(tmp_path / "out"))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert f"cannot read {tmp_path / 'day_0.gz'}" in proc.stderr and "gzip" in proc.stderr
  assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_messages_use_flag_names_and_file_text_not_python_words(tmp_path):
  good = write(tmp_path / "good.txt", [make_line()] * 2)
  assert _convert_cli("--files", str(good), "--out", str(tmp_path / "out")).returncode == 0
  proc = _convert_cli("--files", str(good), "--out", str(tmp_path / "out"))
  assert proc.returncode == 2 and "--overwrite" in proc.stderr and "overwrite=True" not in proc.stderr
  header = write(tmp_path / "header.txt", ["label\t" + "\t".join(make_line().split("\t")[1:]), make_line()])
  proc = _convert_cli("--files", str(header), "--out", str(tmp_path / "h"))
  assert proc.returncode == 2 and "got 'label' (a header line?" in proc.stderr and "b'" not in proc.stderr
