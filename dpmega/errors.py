"""Errors the library raises on purpose."""


class UsageError(ValueError):
  """Bad input from a user (flag, config field, file): exit code 2 in the CLI."""

