"""Progress bars: shown on a terminal by default, forced on or off by ``progress=True/False``."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress_bar(iterable: Any = None, *, progress: bool | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar; ``progress=None`` shows it only when stderr is a terminal."""
    disable = None if progress is None else not progress
    return tqdm(iterable, disable=disable, dynamic_ncols=True, **kwargs)
