"""WordPiece vocabularies: the BERT tokenizer, its special ids, and training a ``vocab.txt``.

A BERT ``vocab.txt`` (one token per line, the id is the line number) is read by
HuggingFace ``tokenizers`` (:class:`WordPiece`); :func:`train_wordpiece` writes
one from text files. The five special tokens (:data:`SPECIAL_TOKENS`) are
required; packing (:mod:`dpmega.data.text`) and masking
(:mod:`dpmega.data.masking`) use their ids (:class:`SpecialIds`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Sequence

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of the special tokens in a vocabulary."""

  pad: int
  unk: int
  cls: int
  sep: int
  mask: int

  @property
  def all(self) -> tuple[int, ...]:
    return (self.pad, self.unk, self.cls, self.sep, self.mask)


class WordPiece:
  """A BERT WordPiece tokenizer (HuggingFace ``tokenizers``) and its special ids.

  Args:
    vocab_path: a BERT ``vocab.txt`` (one token per line, the id is the line
      number); must contain ``[PAD] [UNK] [CLS] [SEP] [MASK]``.
    lowercase: lower-case and strip accents (``True`` for "uncased" vocabularies).

  Raises:
    ValueError: naming ``vocab_path`` if the file is missing or lacks a special token.
  """

  def __init__(self, vocab_path: str | os.PathLike, *, lowercase: bool = True):
    path = pathlib.Path(vocab_path)
    if not path.is_file():
      raise ValueError(f"vocab_path must be an existing vocab.txt file, got {str(path)!r}.")
    from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top

    # vocab.txt: the id of a token is its line number.
    with open(path, encoding="utf-8") as f:
      vocab = {line.rstrip("\n"): i for i, line in reversed(list(enumerate(f)))}
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
      raise ValueError(f"vocab_path {str(path)!r} must contain the special tokens {SPECIAL_TOKENS}, missing {missing}.")
    self.vocab_path = path
    self.lowercase = lowercase
    self._tok = BertWordPieceTokenizer(str(path), lowercase=lowercase)
    self.special = SpecialIds(*(self._tok.token_to_id(t) for t in SPECIAL_TOKENS))
    self.vocab_size = self._tok.get_vocab_size()

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without [CLS]/[SEP] (packing adds them)."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode(list(map(int, ids)), skip_special_tokens=False)

  def id_to_token(self, i: int) -> str:
    return self._tok.id_to_token(int(i))


def train_wordpiece(
    files: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int,
    min_frequency: int = 2,
    lowercase: bool = True,
) -> pathlib.Path:
  """Trains a WordPiece vocabulary on text files and writes ``out_dir/vocab.txt``.

  The five special tokens get ids 0..4 in :data:`SPECIAL_TOKENS` order.

  .. warning::
     A vocabulary trained on the private corpus is itself a function of the
     private data and is not covered by the DP guarantee of training. For a
     formal guarantee, train it on public text (as the demo does) or use a
     public ``vocab.txt``.

  Returns:
    The path of the written ``vocab.txt``.
  """
  if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < len(SPECIAL_TOKENS) + 1:
    raise ValueError(f"vocab_size must be an int >= {len(SPECIAL_TOKENS) + 1}, got {vocab_size=!r}.")
  files = [str(f) for f in files]
  for f in files:
    if not os.path.isfile(f):
      raise ValueError(f"files must be existing text files, got {f!r}.")
  from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  tok = BertWordPieceTokenizer(lowercase=lowercase)
  tok.train(files, vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=list(SPECIAL_TOKENS))
  tok.save_model(str(out))
  return out / "vocab.txt"
