"""Tests of the text pipeline: dpmega/data/wordpiece.py (WordPiece), text.py (corpus, packing, sources),
masking.py (dynamic masking)."""

import numpy as np
import jax
import pytest

pytest.importorskip("tokenizers")

from dpmega.data import masking  # noqa: E402
from dpmega.data import text  # noqa: E402
from dpmega.data import wordpiece  # noqa: E402

SPECIAL = wordpiece.SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return text.prepare_stdlib_corpus(tmp_path_factory.mktemp("stdlib"), vocab_size=512)


# ----------------------------------------------------------------------------- tokenizer and corpus


def test_stdlib_corpus_is_english_prose_split_by_module_and_cached(corpus, tmp_path_factory):
  train = corpus.train.read_text()
  evaluation = corpus.eval.read_text()
  assert len(train) > 300_000 and len(evaluation) > 20_000
  assert " the " in train and " return " in train.lower()
  docs = text.stdlib_docstrings()
  by_module = {}
  for module, doc in docs:
    by_module.setdefault(module.split(".")[0], set()).add(doc)
  held_out = {m for m in by_module if text._eval_module(m, 10)}  # pylint: disable=protected-access
  assert held_out and len(held_out) < len(by_module) / 4
  train_docs = set(text.read_documents([corpus.train]))
  eval_docs = set(text.read_documents([corpus.eval]))
  assert eval_docs == set().union(*(by_module[m] for m in held_out))
  assert train_docs == set().union(*(by_module[m] for m in by_module if m not in held_out))
  # Second call: the same files, not rewritten.
  mtime = corpus.vocab.stat().st_mtime_ns
  again = text.prepare_stdlib_corpus(corpus.vocab.parent.parent, vocab_size=512)
  assert again == corpus and corpus.vocab.stat().st_mtime_ns == mtime


def test_trained_vocab_has_special_tokens_first_and_round_trips(corpus):
  tok = wordpiece.WordPiece(corpus.vocab)
  assert tok.special == SPECIAL and tok.vocab_size == 512
  ids = tok.encode(["Return the number of items in the list."])[0]
  assert 1 not in ids  # no [UNK] for plain English
  assert tok.decode(ids) == "return the number of items in the list."


def test_user_supplied_bert_vocab_txt_is_used_as_given(tmp_path):
  # Google BERT's layout: [PAD]=0, [unused..], [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103.
  words = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  words += ["the", "cat", "sat", "on", "mat", "##s", "."]
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(words) + "\n")
  tok = wordpiece.WordPiece(path)
  assert tok.special == wordpiece.SpecialIds(pad=0, unk=100, cls=101, sep=102, mask=103)
  assert tok.vocab_size == len(words)
  assert tok.encode(["The cats sat on the mat. Dog"])[0] == [104, 105, 109, 106, 107, 104, 108, 110, 100]


def test_vocab_errors_name_the_argument(tmp_path):
  with pytest.raises(ValueError, match="vocab_path must be an existing vocab.txt"):
    wordpiece.WordPiece(tmp_path / "missing.txt")
  bad = tmp_path / "vocab.txt"
  bad.write_text("[PAD]\n[UNK]\nhello\n")
  missing = r"missing \['\[CLS\]', '\[SEP\]', '\[MASK\]'\]"
  with pytest.raises(ValueError, match=r"must contain the special tokens .* " + missing):
    wordpiece.WordPiece(bad)
  with pytest.raises(ValueError, match="vocab_size must be an int >= 6"):
    wordpiece.train_wordpiece([bad], tmp_path / "v", vocab_size=3)


def test_read_documents_splits_on_blank_lines(tmp_path):
  f = tmp_path / "a.txt"
  f.write_text("First line.\nSecond line.\n\n\nNext doc.\n  \nLast\n")
  assert list(text.read_documents([f])) == ["First line. Second line.", "Next doc.", "Last"]


# ----------------------------------------------------------------------------- packing


def test_pack_ids_rows_are_exact_length_and_lose_nothing():
  docs = [[10, 11, 12], [], [13], list(range(20, 37)), [40, 41]]
  rows = list(text.pack_ids(docs, seq_len=8, special=SPECIAL))
  assert all(r.shape == (8,) and r.dtype == np.int32 and r[0] == SPECIAL.cls for r in rows)
  stream = [t for d in docs if d for t in d + [SPECIAL.sep]]
  body = [t for r in rows for t in r[1:] if t != SPECIAL.pad]
  assert body == stream[:len(body)]
  assert stream[len(body):] in ([], [SPECIAL.sep])  # at most the final separator is dropped
  assert all(SPECIAL.pad not in r for r in rows[:-1])  # only the last row is padded


def test_pack_ids_drops_a_last_row_with_only_a_separator():
  rows = list(text.pack_ids([[5] * 7], seq_len=8, special=SPECIAL))
  assert len(rows) == 1 and rows[0].tolist() == [2] + [5] * 7
  with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
    list(text.pack_ids([[5]], seq_len=1, special=SPECIAL))


def test_pack_to_file_round_trips_through_a_memmap_source(corpus, tmp_path):
  tok = wordpiece.WordPiece(corpus.vocab)
  docs = ["Return the sum of a and b.", "Open the file and read it.", "x" * 3]
  n = text.pack_to_file(docs, tmp_path / "p.bin", tok, seq_len=16)
  src = text.packed_source(tmp_path / "p.bin", seq_len=16)
  assert len(src) == n >= 1
  rows = list(text.pack_ids(tok.encode(docs), seq_len=16, special=tok.special))
  np.testing.assert_array_equal(src.take(np.arange(n))["input_ids"], np.stack(rows))
  with pytest.raises(ValueError, match="does not hold int32 rows"):
    text.packed_source(tmp_path / "p.bin", seq_len=7)


def test_text_file_source_packs_once_into_the_cache(corpus, tmp_path):
  tok = wordpiece.WordPiece(corpus.vocab)
  cache = tmp_path / "cache.bin"
  src = text.text_file_source([corpus.eval], tok, seq_len=32, cache_path=cache, max_rows=100)
  assert len(src) == 100 and cache.is_file()
  assert src.take(np.array([0]))["input_ids"][0, 0] == tok.special.cls


def test_tfds_text_source_reads_through_the_same_packing(corpus, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  tok = wordpiece.WordPiece(corpus.vocab)
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    docs = list(text.tfds_documents("tiny_shakespeare", split="train", feature="text"))
  assert len(docs) >= 1 and all(isinstance(d, str) for d in docs)
  n = text.pack_to_file(docs, tmp_path / "t.bin", tok, seq_len=16)
  assert len(text.packed_source(tmp_path / "t.bin", seq_len=16)) == n


# ----------------------------------------------------------------------------- masking


def _rows(n=4000, t=64, vocab=100, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, size=(n, t)).astype(np.int32)
  lengths = rng.integers(8, t + 1, size=n)
  ids[np.arange(t) >= lengths[:, None]] = SPECIAL.pad
  ids[:, 0] = SPECIAL.cls
  ids[np.arange(n), lengths - 1] = SPECIAL.sep
  return ids


def test_masking_statistics_match_bert():
  ids = _rows()
  cfg = masking.MaskingConfig(max_predictions=12)
  out = jax.device_get(masking.mask_tokens(ids, jax.random.key(0), config=cfg, special=SPECIAL, vocab_size=100))
  w = out["mlm_weights"] > 0
  maskable = (ids != SPECIAL.pad) & (ids != SPECIAL.cls) & (ids != SPECIAL.sep)
  n = maskable.sum(1)
  # Exactly round(15% of the maskable tokens) per row (at least 1, at most P), used slots first.
  np.testing.assert_array_equal(w.sum(1), np.clip(np.round(0.15 * n), 1, 12))
  assert np.all(w[:, :-1] >= w[:, 1:])
  rows = np.repeat(np.arange(len(ids))[:, None], 12, 1)
  pos, lab = out["mlm_positions"], out["mlm_labels"]
  # Chosen positions are distinct maskable tokens; labels are the original ids.
  assert np.all(maskable[rows[w], pos[w]])
  assert all(len(set(p[m])) == m.sum() for p, m in zip(pos, w))
  np.testing.assert_array_equal(lab[w], ids[rows[w], pos[w]])
  # Unchosen tokens (and all specials) are untouched.
  chosen = np.zeros_like(ids, bool)
  chosen[rows[w], pos[w]] = True
  np.testing.assert_array_equal(out["input_ids"][~chosen], ids[~chosen])
  # 80% [MASK], 10% random, 10% unchanged (a random draw equal to the original: 1/95).
  new = out["input_ids"][rows[w], pos[w]]
  total = w.sum()
  frac_mask = np.mean(new == SPECIAL.mask)
  frac_same = np.mean(new == lab[w])
  frac_other = 1 - frac_mask - frac_same
  tol = 4 * np.sqrt(0.25 / total)
  assert total > 15_000
  assert abs(frac_mask - 0.8) < tol
  assert abs(frac_same - (0.1 + 0.1 / 95)) < tol
  assert abs(frac_other - 0.1 * 94 / 95) < tol
  replaced = new[(new != SPECIAL.mask) & (new != lab[w])]
  assert replaced.min() >= 5 and replaced.max() < 100  # random tokens are never special
  # Uniform over maskable positions: every position of the long rows is chosen ~15% of the time.
  long_rows = n == 62
  per_position = chosen[long_rows][:, 1:63].mean(0)
  expected = np.round(0.15 * 62) / 62
  assert np.all(np.abs(per_position - expected) < 4 * np.sqrt(expected * (1 - expected) / long_rows.sum()) + 0.01)


def test_masking_is_a_function_of_the_key():
  ids = _rows(n=64)
  cfg = masking.MaskingConfig(max_predictions=12)
  a = masking.mask_tokens(ids, jax.random.key(1), config=cfg, special=SPECIAL, vocab_size=100)
  b = masking.mask_tokens(ids, jax.random.key(1), config=cfg, special=SPECIAL, vocab_size=100)
  c = masking.mask_tokens(ids, jax.random.key(2), config=cfg, special=SPECIAL, vocab_size=100)
  np.testing.assert_array_equal(a["mlm_positions"], b["mlm_positions"])
  assert not np.array_equal(a["mlm_positions"], c["mlm_positions"])


def test_padding_row_gets_no_prediction_slots():
  ids = np.zeros((2, 16), np.int32)
  ids[1, :3] = [SPECIAL.cls, 7, SPECIAL.sep]
  out = masking.mask_tokens(ids, jax.random.key(0), config=masking.MaskingConfig(max_predictions=4), special=SPECIAL,
                         vocab_size=20)
  assert out["mlm_weights"].tolist() == [[0, 0, 0, 0], [1, 0, 0, 0]]
  assert int(out["mlm_positions"][1, 0]) == 1 and int(out["mlm_labels"][1, 0]) == 7
  np.testing.assert_array_equal(out["input_ids"][0], ids[0])


def test_masking_config_errors_name_the_field():
  with pytest.raises(ValueError, match="mask_rate must be in"):
    masking.MaskingConfig(mask_rate=0.0)
  with pytest.raises(ValueError, match="max_predictions must be an int >= 1"):
    masking.MaskingConfig(max_predictions=0)
  with pytest.raises(ValueError, match="sum <= 1"):
    masking.MaskingConfig(mask_token_prob=0.95, random_token_prob=0.1)
  with pytest.raises(ValueError, match="max_predictions must be <= the sequence length 8"):
    masking.mask_tokens(np.zeros((1, 8), np.int32), jax.random.key(0), config=masking.MaskingConfig(max_predictions=9),
                     special=SPECIAL, vocab_size=20)
