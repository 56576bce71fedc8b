"""Outputs replace their previous version by a rename, so a crash mid-save never leaves a half-written file or
folder: the reader sees either the old output or the new one.

Hand-written on the standard library (`os.replace`, `os.rename`): packages for atomic writes cover single files
only, and a folder needs the write-beside-then-rename steps below. POSIX cannot swap two folders in one call, so a
folder is replaced by two renames (old aside, new in) with nothing written in between.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing_dir(target: Path) -> Iterator[Path]:
    """Yield an empty sibling folder to write into; when the block ends without error it becomes `target`.

    Args:
        target: The folder the written folder becomes. A previous `target` is replaced only once the block ends
            without error; a `target.partial` left by a process that died while writing is removed first.

    Yields:
        The empty folder `target.partial` to write into; it is removed if the block raises.
    """
    target = Path(target)
    partial = target.with_name(f"{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a process that died while writing
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists():
        previous = target.with_name(f"{target.name}.previous")
        shutil.rmtree(previous, ignore_errors=True)
        target.rename(previous)
        partial.rename(target)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        partial.rename(target)


@contextmanager
def replacing_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target` to write to; when the block ends without error it replaces `target`.

    Args:
        target: The file to replace.

    Yields:
        The path `.{name}.partial-{pid}` beside `target`; it is removed if the block raises.
    """
    target = Path(target)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, target)  # atomic on POSIX and Windows when both are on one filesystem, as here


def write_text(target: Path, text: str) -> None:
    """Write `text` to `target` atomically (UTF-8): a reader sees the old file or the new one, never half of it.

    Args:
        target: The file to write or replace.
        text: The whole new content.
    """
    with replacing_file(target) as partial:
        partial.write_text(text, encoding="utf-8")


def copy_file(source: Path, target: Path) -> None:
    """Copy `source` to `target` atomically: a reader sees the old `target` or the complete copy, never half of it.

    Args:
        source: The file to copy.
        target: Where the copy goes; an existing file there is replaced.
    """
    with replacing_file(target) as partial:
        shutil.copyfile(source, partial)
