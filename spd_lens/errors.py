"""The one error type spd_lens raises for bad input, so callers (and the CLI) can tell it apart."""


class SpdLensError(ValueError):
    """A user-facing error: the message names the bad value and says what to do instead.

    Example:
        >>> from spd_lens import get_task
        >>> try:
        ...     get_task("arithmatic")
        ... except SpdLensError as err:
        ...     "arithmetic" in str(err)
        True
    """
