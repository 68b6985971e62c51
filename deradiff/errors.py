"""User-facing errors.

A `DeradiffError` is a problem with what the user asked for (a bad value, a missing file). The CLI prints
its message as one line and exits non-zero without a traceback; any other exception is a bug.
"""


class DeradiffError(Exception):
    """Bad user input or environment: the message names the bad value and what is expected."""


class ConfigError(DeradiffError):
    """An invalid configuration: unknown key, wrong type, missing required value."""
