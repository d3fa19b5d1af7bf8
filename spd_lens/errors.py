"""The one error type spd_lens raises for bad input, so callers (and the CLI) can tell it apart."""


class SpdLensError(ValueError):
    """A user-facing error: the message names the bad value and says what to do instead."""
