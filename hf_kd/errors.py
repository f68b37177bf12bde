"""Errors whose one-line message names the fix: the command line prints them without a traceback."""


class ConfigError(ValueError):
    """A recipe config (or the command line) names something that does not exist or has the wrong type."""


class TokenizerMismatchError(ValueError):
    """Teacher and student tokenizers map tokens to different ids, so their distributions cannot be compared."""
