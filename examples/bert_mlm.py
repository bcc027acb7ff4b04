"""Private masked-LM pretraining of a tiny BERT, end to end on CPU, then fill in a [MASK].

The recipe of Anil et al. 2021 ("Large-Scale Differentially Private BERT",
https://arxiv.org/abs/2108.01624) at toy size: DP-SGD with Poisson sampling,
Adam, sigma calibrated to the target epsilon before step 1, at the constant
batch the issue-20 sweeps found best at this size (the paper's increasing
schedule: ``dpmega train --config configs/bert_tiny_mlm.py --set
batch_schedule=geometric:256->1024``; see that config for when it pays). The text is the docstrings of this Python's standard
library (built into a cache on first use; nothing is downloaded).

  python examples/bert_mlm.py                              # configs/bert_tiny_mlm.py as is
  python examples/bert_mlm.py --steps 60 --target_epsilon 8
  python examples/bert_mlm.py --noise_multiplier 0.5 --batch 256 --steps 90

The same run from the command line: ``dpmega train --config configs/bert_tiny_mlm.py``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpmega.train import config as config_lib  # noqa: E402
from dpmega import train  # noqa: E402
from dpmega.data import text  # noqa: E402
from dpmega.data import wordpiece  # noqa: E402
from dpmega.models import bert  # noqa: E402
from dpmega.tasks import bert as bert_task  # noqa: E402

SENTENCES = (
    "Return a new list containing all items from the iterable in ascending order.",
    "Raise a ValueError if the value is not present.",
)


def fill_masks(config, params, sentences=SENTENCES) -> list[tuple[str, str, str]]:
  """For each sentence, masks its middle word-piece and returns (sentence, masked piece, prediction)."""
  cache = pathlib.Path(config.task.cache_dir) if config.task.cache_dir else text.default_cache_dir()
  corpus = text.prepare_stdlib_corpus(cache / "text", vocab_size=config.task.vocab_size)
  tok = wordpiece.WordPiece(corpus.vocab)
  model = bert.BertMLM(bert_task.model_config(config.task, vocab_size=tok.vocab_size, pad_id=tok.special.pad))
  out = []
  for sentence in sentences:
    ids = [tok.special.cls] + tok.encode([sentence])[0][:config.task.seq_len - 2] + [tok.special.sep]
    position = len(ids) // 2
    truth = tok.id_to_token(ids[position])
    ids[position] = tok.special.mask
    logits = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray([position]))
    out.append((sentence, truth, tok.id_to_token(int(jnp.argmax(logits[0])))))
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=None, help="logical steps (config: 120)")
  parser.add_argument("--batch", type=int, default=None, help="constant batch size (config: 1,024)")
  parser.add_argument("--target_epsilon", type=float, default=None)
  parser.add_argument("--noise_multiplier", type=float, default=None)
  parser.add_argument("--num_layers", type=int, default=0, help="override the tiny preset's 2 layers")
  parser.add_argument("--cache_dir", default="", help="where the corpus and vocabulary are cached")
  parser.add_argument("--workdir", default=None, help="checkpoints and metrics (default: a temp dir)")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)

  config = config_lib.load_config(str(ROOT / "configs" / "bert_tiny_mlm.py"))
  config.task.cache_dir = args.cache_dir
  config.task.num_layers = args.num_layers
  if args.steps is not None:
    config.num_steps = args.steps
  if args.batch is not None:
    config.batch_schedule = f"constant:{args.batch}"
  if args.target_epsilon is not None or args.noise_multiplier is not None:
    config.target_epsilon = args.target_epsilon
    config.noise_multiplier = args.noise_multiplier
  config.tensorboard = False
  config.checkpoint_every = 0
  out = (lambda line: None) if args.quiet else print
  with tempfile.TemporaryDirectory() as tmp:
    config.workdir = args.workdir or str(pathlib.Path(tmp) / "run")
    result = train.train(config, out=out)
  filled = fill_masks(config, result.params)
  for sentence, truth, guess in filled:
    out(f"{sentence!r}: masked {truth!r}, predicted {guess!r}")
  return {"epsilon": result.epsilon, "delta": result.delta, "noise_multiplier": result.noise_multiplier,
          "steps": result.steps, "filled": filled, **result.eval_metrics}


if __name__ == "__main__":
  main()
