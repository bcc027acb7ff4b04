"""Declared config fields: a dataclass field that carries its default, its allowed values and its help.

A config dataclass declares each field once, e.g.
``clip_norm: float = fields.positive(1.0, doc="L2 bound C")``; from those
declarations this module derives the ``ml_collections.ConfigDict`` a config
file starts from (:func:`config_dict`), the check of a ConfigDict, which
returns the typed values (:func:`checked`), and a table of the fields
(:func:`describe`). Every error is a :class:`dpmega.errors.UsageError` that
names the field's dotted path and its allowed values
(:mod:`dpmega.validation` words it). :mod:`dpmega.train.config` declares the
trainer's fields with it.

>>> import dataclasses
>>> @dataclasses.dataclass(frozen=True)
... class Example:
...   steps: int = integer(10, 1, 100, doc="steps to run")
...   rate: float = positive(0.5, doc="a rate")
>>> config = config_dict(Example)
>>> config.steps = 0
>>> checked(Example, config)
Traceback (most recent call last):
...
dpmega.errors.UsageError: steps must be an int in [1, 100], got steps=0.
>>> print(describe(Example))
steps = 10  [1, 100]  steps to run
rate = 0.5  (0.0, inf)  a rate
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any, Callable, Mapping, Sequence

import ml_collections
from ml_collections import config_dict as config_dict_lib

from dpmega import schedules
from dpmega import validation
from dpmega.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Spec:
  """How one field is declared (kept in the metadata of its dataclass field).

  Attributes:
    default: the value :func:`config_dict` writes (what a config file starts from); None: unset.
    kind: ``"int"``, ``"real"``, ``"bool"``, ``"choice"``, ``"path"`` (a non-empty string), ``"schedule"``
      (:func:`dpmega.schedules.as_schedule`; a ramp without ``@RAMP`` spans the field ``num_steps``) or
      ``"text"`` (a string, possibly empty, that ``parse`` turns into the stored value).
    doc: what the field means.
    lo: lower end of an int's or a real's range.
    hi: upper end; a str names an earlier top-level field whose value is the bound (``"num_steps"``).
    lo_open: the range excludes ``lo`` (reals).
    hi_open: the range excludes ``hi`` (reals).
    optional: None is allowed (and means unset).
    choices: an :class:`enum.Enum` class (the value becomes its member), or a function returning the allowed
      strings (called when checking, so that heavy modules are imported only then).
    key: the field's dotted place in the ConfigDict when it is not its own name (``"task.name"``).
  """

  default: Any
  kind: str
  doc: str
  lo: float = -math.inf
  hi: float | str = math.inf
  lo_open: bool = False
  hi_open: bool = False
  optional: bool = False
  choices: type[enum.Enum] | Callable[[], Sequence[str]] | None = None
  key: str | None = None
  parse: Callable[[str], Any] | None = None
  syntax: str = ""

  def typed_default(self) -> Any:
    """The default as :func:`checked` returns it (an enum member, a float, a schedule)."""
    if self.default is None:
      return None
    if self.kind == "choice" and isinstance(self.choices, type):
      return self.choices(self.default)
    if self.kind == "real":
      return float(self.default)
    if self.kind == "schedule":
      return schedules.as_schedule(self.default)
    if self.kind == "text":
      return self.parse(self.default)
    return self.default

  def allowed(self) -> str:
    """The allowed values, as the error messages print them."""
    if self.kind in ("int", "real"):
      text = f"{'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
    elif self.kind == "choice":
      text = str(_choice_values(self.choices))
    else:
      text = {"bool": "True or False", "path": "a non-empty path", "schedule": "a batch schedule",
              "text": self.syntax}[self.kind]
    return text + (" or None" if self.optional else "")


# ------------------------------------------------------------------------------------- declaring a field
def field(spec: Spec) -> Any:
  """A dataclass field whose default is ``spec``'s typed default."""
  return dataclasses.field(default=spec.typed_default(), metadata={"spec": spec})


def integer(default: int | None, lo: int, hi: float | str = math.inf, *, doc: str, optional: bool = False) -> Any:
  """An int in ``[lo, hi]`` (``hi`` may name an earlier top-level field)."""
  return field(Spec(default, "int", doc, lo, hi, optional=optional))


def real(default: float | None, lo: float, hi: float = math.inf, *, doc: str, lo_open: bool = False,
         hi_open: bool = False, optional: bool = False) -> Any:
  """A finite real in the range."""
  return field(Spec(default, "real", doc, lo, hi, lo_open=lo_open, hi_open=hi_open, optional=optional))


def positive(default: float | None, *, doc: str, optional: bool = False) -> Any:
  """A finite real in ``(0, inf)``."""
  return real(default, 0.0, math.inf, lo_open=True, hi_open=True, doc=doc, optional=optional)


def flag(default: bool, *, doc: str) -> Any:
  """``True`` or ``False``."""
  return field(Spec(default, "bool", doc))


def choice(default: str, choices: type[enum.Enum] | Callable[[], Sequence[str]], *, doc: str,
           key: str | None = None) -> Any:
  """One of an enum's values (checked into its member) or of the strings ``choices()`` returns."""
  return field(Spec(default, "choice", doc, choices=choices, key=key))


def path(default: str, *, doc: str) -> Any:
  """A non-empty string (a file or directory path)."""
  return field(Spec(default, "path", doc))


def text(default: str, parse: Callable[[str], Any], *, syntax: str, doc: str) -> Any:
  """A string (possibly empty) that ``parse`` turns into the stored value; its ValueError names the field."""
  return field(Spec(default, "text", doc, parse=parse, syntax=syntax))


def schedule(default: str, *, doc: str) -> Any:
  """A batch-size schedule (:func:`dpmega.schedules.as_schedule`); a ramp without ``@RAMP`` spans ``num_steps``."""
  return field(Spec(default, "schedule", doc))


def group(cls: type, *, doc: str, build: Callable[[Any], Any] | None = None) -> Any:
  """A nested group of fields (its own dataclass); ``build`` turns the checked group into the stored value."""
  factory = cls if build is None else (lambda: build(cls()))
  return dataclasses.field(default_factory=factory, metadata={"group": cls, "build": build, "doc": doc})


def _choice_values(choices) -> list[str]:
  return [e.value for e in choices] if isinstance(choices, type) else list(choices())


def _fields(cls: type) -> list[tuple[str, dataclasses.Field]]:
  """``(dotted key in the ConfigDict, field)`` of ``cls``'s fields, groups included."""
  return [((f.metadata["spec"].key if "spec" in f.metadata else None) or f.name, f) for f in dataclasses.fields(cls)]


# ------------------------------------------------------------------------------------- what is derived
def config_dict(cls: type) -> ml_collections.ConfigDict:
  """The ConfigDict of ``cls``'s fields with their defaults (typed placeholders for None)."""
  c = ml_collections.ConfigDict()
  for key, f in _fields(cls):
    if "group" in f.metadata:
      c[key] = config_dict(f.metadata["group"])
      continue
    spec = f.metadata["spec"]
    *parents, leaf = key.split(".")
    node = c
    for part in parents:
      if part not in node:
        node[part] = ml_collections.ConfigDict()
      node = node[part]
    node[leaf] = spec.default if spec.default is not None else config_dict_lib.placeholder(
        int if spec.kind == "int" else float)
  return c


def describe(cls: type, prefix: str = "") -> str:
  """One line per field, groups flattened: ``key = default  allowed  doc``."""
  lines = []
  for key, f in _fields(cls):
    if "group" in f.metadata:
      lines.append(describe(f.metadata["group"], f"{prefix}{key}."))
    else:
      spec = f.metadata["spec"]
      lines.append(f"{prefix}{key} = {spec.default!r}  {spec.allowed()}  {spec.doc}")
  return "\n".join(lines)


def check(spec: Spec, name: str, value: Any, top: Mapping[str, Any]) -> Any:
  """``value`` checked against ``spec`` and converted; ``UsageError`` naming ``name`` and the allowed values."""
  if value is None and spec.optional:
    return None
  if spec.kind == "int":
    hi = top[spec.hi] if isinstance(spec.hi, str) else spec.hi
    return validation.check_int(name, value, spec.lo, hi, error=UsageError)
  if spec.kind == "real":
    return validation.check_real(name, value, spec.lo, spec.hi, lo_open=spec.lo_open, hi_open=spec.hi_open,
                                 optional=spec.optional, error=UsageError)
  if spec.kind == "bool":
    return validation.check_bool(name, value, error=UsageError)
  if spec.kind == "choice":
    value = validation.check_choice(name, value, _choice_values(spec.choices), error=UsageError)
    return spec.choices(value) if isinstance(spec.choices, type) else value
  if spec.kind == "path":
    if not isinstance(value, str) or not value:
      raise UsageError(f"{name} must be a non-empty path, got {name}={value!r}.")
    return value
  if spec.kind == "text":
    if value is None:
      value = ""
    if not isinstance(value, str):
      raise UsageError(f"{name} must be a string ({spec.syntax}), got {name}={value!r}.")
    try:
      return spec.parse(value)
    except ValueError as e:
      raise UsageError(f"{name}: {e}") from None
  try:
    return schedules.as_schedule(value, num_steps=top["num_steps"])
  except ValueError as e:
    raise UsageError(f"{name}: {e}") from None


def checked(cls: type, node: ml_collections.ConfigDict, prefix: str = "",
            top: dict[str, Any] | None = None) -> dict[str, Any]:
  """The checked, typed values of ``cls``'s fields read from ``node``, in declaration order.

  A field missing from ``node`` reads as None. ``top`` holds the top-level values checked so far (a bound
  such as ``hi="num_steps"`` reads it); groups are built from their checked values.
  """
  values = {}
  top = values if top is None else top
  for key, f in _fields(cls):
    if "group" in f.metadata:
      sub_node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
      sub = f.metadata["group"](**checked(f.metadata["group"], sub_node, f"{prefix}{key}.", top))
      values[f.name] = f.metadata["build"](sub) if f.metadata["build"] else sub
      continue
    value = node
    for part in key.split("."):
      value = value.get(part) if isinstance(value, ml_collections.ConfigDict) else None
    values[f.name] = check(f.metadata["spec"], prefix + key, value, top)
  return values
