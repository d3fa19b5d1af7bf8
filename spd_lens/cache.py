"""Where spd_lens keeps derived files (never inside the repository)."""

import os
from pathlib import Path


def cache_root() -> Path:
    """`$SPD_LENS_CACHE`, else `$XDG_CACHE_HOME/spd_lens`, else `~/.cache/spd_lens`."""
    if os.environ.get("SPD_LENS_CACHE"):
        return Path(os.environ["SPD_LENS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "spd_lens"
