"""Progress bars for the long loops (manifest hashing, cache building), on stderr and only on a
terminal: in DVC, CI and Prefect logs they would be noise."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """``items`` with a progress bar while a person watches (tqdm's ``disable=None``: only when
    stderr is a terminal), plain otherwise."""
    from tqdm import tqdm

    return iter(tqdm(items, total=total, desc=desc, unit="file", leave=False, file=sys.stderr, disable=None))
