"""The installed-packages corpus (dpmega.data.package_corpus): reproducible, deduplicated, split by package."""

import hashlib
import json
import pathlib
import shutil
import sysconfig

import numpy as np
import pytest

from dpmega.data import package_corpus as pc
from dpmega.data import text
from dpmega.tasks import bert as bert_task
from dpmega.train import config as config_lib

_STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"])
# Real prose that no one here wrote, copied from the standard library into a fake site-packages.
_PACKAGES = {"alpha": "json", "beta": "email", "gamma": "logging", "delta": "importlib"}
_NEAR_COPY = "RETURN  a  list of Names: found in the SEARCHED directories (version 3)!"
_ORIGINAL = "Return a list of names found in the searched directories, version 2."


@pytest.fixture(scope="module")
def site(tmp_path_factory):
  root = tmp_path_factory.mktemp("site")
  for name, stdlib_pkg in _PACKAGES.items():
    shutil.copytree(_STDLIB / stdlib_pkg, root / name, ignore=shutil.ignore_patterns("__pycache__"))
  (root / "alpha" / "extra.py").write_text(f'"""{_ORIGINAL}\n\n>>> code()\n1\n"""\n')
  (root / "gamma" / "extra.py").write_text(f'"""{_NEAR_COPY}"""\n')  # a near-exact copy, in another package
  (root / "gamma" / "tests").mkdir()
  (root / "gamma" / "tests" / "__init__.py").write_text('"""Tests are not harvested: NEVER_HARVESTED prose."""\n')
  (root / "delta" / "GUIDE.md").write_text("A guide to the delta package, written as plain Markdown prose.\n")
  (root / "dpmega").mkdir()
  (root / "dpmega" / "__init__.py").write_text('"""Our own text is not harvested: NOT_OURS_HARVESTED."""\n')
  return root


def _build(tmp_path, site, **kw):
  return pc.prepare_package_corpus(tmp_path, packages=list(_PACKAGES), vocab_size=256, eval_percent=30,
                                   site_dir=site, **kw)


def _paragraphs(path):
  return [line for line in pathlib.Path(path).read_text().splitlines() if line]


def test_installed_packages_are_sorted_and_skip_our_own_and_tests(site):
  assert pc.installed_packages(site) == sorted(_PACKAGES)


def test_corpus_is_deterministic_and_reports_its_content_hash(tmp_path, site):
  a, b = _build(tmp_path / "a", site), _build(tmp_path / "b", site)
  assert a.files.train.read_bytes() == b.files.train.read_bytes()
  assert a.files.eval.read_bytes() == b.files.eval.read_bytes()
  assert a.stats["train"]["sha256"] == hashlib.sha256(a.files.train.read_bytes()).hexdigest() == b.stats[
      "train"]["sha256"]
  assert a.stats["eval"]["sha256"] == hashlib.sha256(a.files.eval.read_bytes()).hexdigest()
  manifest = json.loads((a.files.train.parent / "manifest.json").read_text())
  assert manifest["stats"] == a.stats
  # Cached: a second call with the same inputs reads the manifest back.
  assert _build(tmp_path / "a", site) == a


def test_corpus_is_deduplicated_exact_and_near_exact(tmp_path, site):
  corpus = _build(tmp_path, site)
  paras = _paragraphs(corpus.files.train) + _paragraphs(corpus.files.eval)
  keys = [pc.near_duplicate_key(p) for p in paras]
  assert len(keys) == len(set(keys))
  assert corpus.stats["duplicate_paragraphs_dropped"] >= 1
  kept = [p for p in paras if pc.near_duplicate_key(p) == pc.near_duplicate_key(_ORIGINAL)]
  assert kept == [_ORIGINAL]  # the first in sorted package order (alpha) wins; gamma's copy is dropped
  assert not any(">>>" in p or "NEVER_HARVESTED" in p or "NOT_OURS_HARVESTED" in p for p in paras)
  assert any("guide to the delta package" in p for p in paras)  # package docs, not only docstrings


def test_split_is_disjoint_by_package(tmp_path, site):
  corpus = _build(tmp_path, site)
  assert corpus.train_packages and corpus.eval_packages
  assert not set(corpus.train_packages) & set(corpus.eval_packages)
  assert set(corpus.train_packages) | set(corpus.eval_packages) == set(_PACKAGES)
  # Every paragraph of a package lands in the part its package is in.
  train, held = set(_paragraphs(corpus.files.train)), set(_paragraphs(corpus.files.eval))
  for name in _PACKAGES:
    own = {p for doc in pc.package_documents(name, site) for p in doc}
    part, other = (held, train) if name in corpus.eval_packages else (train, held)
    assert not own & other
    assert own & part


def test_split_keeps_a_distribution_together():
  sizes = {"attr": 10, "attrs": 10, "big": 80}
  for eval_percent in (10, 20, 30, 50):
    _, held = pc.split_packages(sizes, eval_percent, {"attr": "attrs"})
    assert ("attr" in held) == ("attrs" in held)


def test_bad_arguments_name_the_field(tmp_path, site):
  with pytest.raises(ValueError, match="eval_percent must be an int in"):
    pc.prepare_package_corpus(tmp_path, packages=["alpha"], eval_percent=0, site_dir=site)
  with pytest.raises(ValueError, match="packages must be installed top-level packages.*'nope'"):
    pc.prepare_package_corpus(tmp_path, packages=["alpha", "nope"], site_dir=site)
  with pytest.raises(ValueError, match="cannot be split by package"):
    pc.prepare_package_corpus(tmp_path, packages=["alpha"], site_dir=site, vocab_size=256)


def test_corpus_loads_through_the_bert_task(tmp_path, site):
  config = config_lib.load_config("configs/bert_tiny_mlm.py")
  config.task.source = "packages"
  config.task.corpus_packages = tuple(_PACKAGES)
  config.task.corpus_site_dir = str(site)
  config.task.corpus_eval_percent = 30
  config.task.vocab_size = 256
  config.task.cache_dir = str(tmp_path)
  task = bert_task.build_task(config)
  corpus = _build(tmp_path / "text", site)  # the files the task read (its cache)
  rows = np.asarray(task.train_source.arrays["input_ids"])
  assert rows.shape[1] == 32 and len(rows) > 100
  # The same rows as packing the corpus's train file with the normal text pipeline.
  tokenizer = bert_task.wordpiece.WordPiece(corpus.files.vocab)
  want = list(text.pack_ids(tokenizer.encode(list(text.read_documents([corpus.files.train]))), seq_len=32,
                            special=tokenizer.special))
  np.testing.assert_array_equal(rows, np.stack(want))
  assert 0 < task.evaluate(task.init_params(__import__("jax").random.key(0)))["unigram_accuracy"] < 1
