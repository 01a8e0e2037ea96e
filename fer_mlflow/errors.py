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
MAX_CNN_CONVS = 4  # convolutions in one block of the cnn


def check_widths(widths: tuple[int, ...]) -> tuple[int, ...]:
    """The cnn's `widths` (one channel count per block) if valid, else a ConfigError.

    Here, free of Keras, so that the command line checks them before it imports a framework.
    """
    if not 1 <= len(widths) <= MAX_CNN_BLOCKS or min(widths) < 1:
        raise ConfigError(f"widths must be 1 to {MAX_CNN_BLOCKS} positive channel counts, one per block, "
                          f"e.g. 16,32,128,256; got {','.join(map(str, widths)) or 'none'}")
    return widths


def check_convs(convs: tuple[int, ...], widths: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The cnn's `convs` (convolutions per block: one count for every block, or one per block) if
    valid, else a ConfigError; with `widths`, spelled out to one count per block."""
    if not convs or min(convs) < 1 or max(convs) > MAX_CNN_CONVS:
        raise ConfigError(f"convs must be counts of 1 to {MAX_CNN_CONVS} convolutions per block, e.g. 2 or "
                          f"1,1,1,2; got {','.join(map(str, convs)) or 'none'}")
    if widths is None:
        return convs
    if len(convs) == 1:
        return convs * len(widths)
    if len(convs) != len(widths):
        raise ConfigError(f"convs={','.join(map(str, convs))} gives {len(convs)} blocks but widths="
                          f"{','.join(map(str, widths))} {len(widths)}; give one count per width, or one for all")
    return convs
