"""Audit results: :class:`AuditResult` (claimed against audited ε), the printed table, the JSON file."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, Iterable, Sequence


@dataclasses.dataclass(frozen=True)
class AuditResult:
  """One audit: what the accountant claims against what the audit proves.

  Attributes:
    method: ``"mechanism"``, ``"one_run"`` or ``"sparse"`` (:func:`dpmega.audit.sparse_mechanism_audit`).
    claimed_epsilon: the accountant's ε(δ) for what was audited.
    epsilon_lower_bound: the audit's ε lower bound, valid with ``confidence``.
    confidence: probability that the lower bound is valid.
    delta: the δ of both numbers.
    num_trials: mechanism: runs per neighbouring input; one-run: canaries m.
    noise_multiplier: σ the accountant was told (before the test-only scale).
    clip_norm: C.
    sampling_rate: Poisson rate q, or None for no subsampling.
    steps: DP-SGD steps audited (1 for the mechanism audit).
    noise_scale_for_testing: 1.0 for a real audit; < 1 weakens the noise on purpose.
    accountant: which accountant computed ``claimed_epsilon``.
    exact_epsilon: the exact ε of the Gaussian mechanism when known, else None.
    details: how the bound was obtained (threshold, counts, ...).
    neighbours: ``"add/remove-one"`` or ``"replace-one"``: what the audit's two
      inputs differ by, and the relation of ``claimed_epsilon``.
  """

  method: str
  claimed_epsilon: float
  epsilon_lower_bound: float
  confidence: float
  delta: float
  num_trials: int
  noise_multiplier: float
  clip_norm: float
  sampling_rate: float | None
  steps: int
  noise_scale_for_testing: float = 1.0
  accountant: str = "pld"
  exact_epsilon: float | None = None
  details: dict = dataclasses.field(default_factory=dict)
  neighbours: str = "add/remove-one"

  @property
  def violation(self) -> bool:
    """True when the audit proves more leakage than the accountant claims."""
    return self.epsilon_lower_bound > self.claimed_epsilon

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["violation"] = self.violation
    return d


_COLUMNS = ("audit", "claimed ε", "audited ε ≥", "exact ε", "confidence", "δ", "trials", "σ", "q",
            "steps", "verdict")


def format_table(results: Iterable[AuditResult]) -> str:
  """A plain-text table, one row per audit."""
  rows = [_COLUMNS]
  for r in results:
    method = r.method if r.neighbours == "add/remove-one" else f"{r.method} ({r.neighbours})"
    if r.noise_scale_for_testing != 1.0:
      method += f" (noise x{r.noise_scale_for_testing:g})"
    rows.append((
        method, f"{r.claimed_epsilon:.4g}", f"{r.epsilon_lower_bound:.4g}",
        "-" if r.exact_epsilon is None else f"{r.exact_epsilon:.4g}", f"{r.confidence:g}",
        f"{r.delta:g}", str(r.num_trials), f"{r.noise_multiplier:g}",
        "-" if r.sampling_rate is None else f"{r.sampling_rate:g}", str(r.steps),
        "VIOLATION" if r.violation else "ok"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def write_json(results: Sequence[AuditResult], path: str | os.PathLike) -> None:
  """Writes ``{"audits": [...]}`` to ``path`` atomically (a temp file, then rename).

  Either the whole file appears or, on any error, nothing does.
  """
  path = os.fspath(path)
  text = json.dumps({"audits": [r.to_dict() for r in results]}, indent=2, allow_nan=True) + "\n"
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".audit-", suffix=".json.tmp", dir=directory)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
