"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class FerError(Exception):
    """Base class: the message is a sentence naming the problem and the fix."""


class DataError(FerError):
    """The dataset given as `data` cannot be read or is unusable."""


class ConfigError(FerError):
    """A parameter value is invalid or cannot be honoured on this machine."""


class RegistryError(FerError):
    """The tracking server or model registry failed to answer, even after retries."""


MAX_CNN_BLOCKS = 5  # 48 pixels pooled 2x2 five times is 1x1


def check_widths(widths: tuple[int, ...]) -> tuple[int, ...]:
    """The cnn's `widths` (one channel count per block) if valid, else a ConfigError.

    Here, free of Keras, so that the command line checks them before it imports a framework.
    """
    if not 1 <= len(widths) <= MAX_CNN_BLOCKS or min(widths) < 1:
        raise ConfigError(f"widths must be 1 to {MAX_CNN_BLOCKS} positive channel counts, one per block, "
                          f"e.g. 16,32,128,256; got {','.join(map(str, widths)) or 'none'}")
    return widths
