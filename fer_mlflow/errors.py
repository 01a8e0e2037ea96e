"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class FerError(Exception):
    """Base class: the message is a sentence naming the problem and the fix."""


class DataError(FerError):
    """The dataset given as `data` cannot be read or is unusable."""


class ConfigError(FerError):
    """A parameter value is invalid or cannot be honoured on this machine."""
