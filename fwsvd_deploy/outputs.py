"""Output folders: checked before any work, written to a temporary sibling and renamed only when complete.

Every command that writes a folder goes through :func:`check_output_dir` before its first expensive step and
:func:`atomic_output_dir` to write. Nothing a user owns is overwritten or deleted without ``overwrite``, and an
output never lands on or inside one of the command's inputs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputExistsError, OutputPathError, first_line


def _nearest_existing(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _relation(out: Path, source: Path) -> str | None:
    if out == source:
        return "is"
    if source in out.parents:
        return "is inside"
    if out in source.parents:
        return "holds"
    return None


def check_output_dir(path: str | Path, overwrite: bool = False, *, inputs: Iterable[str | Path | None] = (),
                     reuse: bool = False) -> Path:
    """Refuse an output folder that cannot be written or would clobber something, before any work is done.

    Args:
        path: the output folder.
        overwrite: allow replacing an existing, non-empty folder.
        inputs: paths the command reads (hub ids and ``None`` are ignored); the output may not be one of them or
            sit inside one, nor hold one when it would be replaced.
        reuse: the folder is written into, its contents kept (a cache of an earlier run of the same command).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputExistsError: ``path`` is a file, or a non-empty folder and ``overwrite`` is false.
        OutputPathError: ``path`` is, holds or sits inside an input; or its parent cannot be created or written.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is a file; choose a folder path")
    resolved = out.resolve()
    base = _nearest_existing(resolved.parent)
    if not base.is_dir():
        raise OutputPathError(f"cannot create output folder {out}: {base} is a file, not a folder")
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        relation = _relation(resolved, Path(source).expanduser().resolve())
        if relation is not None and not (relation == "holds" and reuse):
            raise OutputPathError(f"output folder {out} {relation} the input {source}; choose an --out outside "
                                  "the inputs (writing there could delete them)")
    if out.is_dir() and any(out.iterdir()) and not (overwrite or reuse):
        raise OutputExistsError(f"output folder {out} exists and is not empty; pass --overwrite or choose another")
    try:  # the only reliable test (root, read-only mounts, /proc): create and remove a probe
        os.rmdir(tempfile.mkdtemp(prefix=".fwsvd-deploy-probe-", dir=base))
    except OSError as exc:
        raise OutputPathError(f"cannot write output folder {out}: {base} is not writable ({first_line(exc)})") from exc
    return out


def _make_parents(folder: Path) -> list[Path]:
    """Create the missing ancestors of ``folder``; returns those created, deepest first."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        current = current.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False, *,
                      inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only when the block completes.

    An exception (or Ctrl-C) inside the block removes the temporary folder (and any parent folders it created)
    and leaves ``path`` as it was. Replacing an existing folder moves it aside first and puts it back if the
    rename of the new one fails, so at every moment one complete folder is at ``path``.
    """
    out = check_output_dir(path, overwrite, inputs=inputs)
    created = _make_parents(out.parent)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside and restored if the rename fails."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc's ``malloc_trim``), so that a model copy
    let go between stages of a long step no longer counts in the process's resident memory."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
