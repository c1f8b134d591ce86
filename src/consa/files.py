"""Small file helpers every stage shares: atomic writes with ordinary permissions, JSON reads with
one-line errors, and :func:`output_dir`, the one way a command writes its output directory."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConsaError


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask is process-wide)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What ``open()`` gives a new file (0644 under umask 022): mkstemp's 0600 would lock others out."""
    return 0o666 & ~_umask()


def dir_mode() -> int:
    """What ``mkdir()`` gives a new directory (0755 under umask 022), unlike mkdtemp's 0700."""
    return 0o777 & ~_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temp file + rename so a crash never leaves a half-written file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for any writer (savefig, safetensors, numpy); renamed onto
    ``path`` when the block succeeds, removed when it fails. The file ends with :func:`file_mode`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """``mkdtemp`` with the mode ``mkdir`` would give: the directory is renamed into place later."""
    d = Path(tempfile.mkdtemp(dir=parent, prefix=prefix, suffix=".tmp"))
    os.chmod(d, dir_mode())
    return d


def ordinary_modes(root: str | os.PathLike, top: bool = True, since: float | None = None) -> None:
    """Give a freshly written tree the modes open()/mkdir() would have given, whatever wrote it:
    safetensors (and so ``save_pretrained``) writes 0600 files, mkdtemp makes 0700 directories.
    ``top=False`` leaves ``root`` itself alone; ``since`` (a time.time()) leaves entries that were
    not created or changed since then alone: a user's own files in a directory we wrote into."""
    fm, dm = file_mode(), dir_mode()
    if top:
        os.chmod(root, dm)
    for base, dirs, files in os.walk(root):
        for name, mode in [(d, dm) for d in dirs] + [(f, fm) for f in files]:
            p = os.path.join(base, name)
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and (since is None or st.st_ctime >= since):
                try:
                    os.chmod(p, mode)
                except PermissionError:  # someone else's file: not ours to change
                    pass


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _move_into(src: Path, dest: Path) -> None:
    """Move every entry of ``src`` into the existing directory ``dest`` (same names replaced)."""
    for entry in sorted(src.iterdir()):
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink() and entry.is_dir():
            old = Path(tempfile.mkdtemp(dir=dest, prefix=f".{entry.name}.old."))
            os.replace(target, old / entry.name)
            os.replace(entry, target)
            shutil.rmtree(old)
        else:
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)


@contextmanager
def output_dir(path: str | os.PathLike, *, exists: str = "merge", resumable: bool = False,
               keep: Callable[[Path], bool] | None = None, what: str = "--out") -> Iterator[Path]:
    """The directory a command writes its outputs into; a failed command leaves no partial run behind.

    By default the block writes into a fresh hidden sibling, published when it succeeds: renamed
    onto ``path`` when that is new or empty, else moved in entry by entry (``exists="merge"``),
    swapped for the old directory (``"replace"``), or refused before anything is done
    (``"empty"``). Any failure, Ctrl-C included, removes the sibling (and parents made for it).

    ``resumable=True`` (a run with a checkpoint for ``--resume``): the block writes into ``path``
    itself, so an interrupted run can continue. A KeyboardInterrupt keeps it; any other failure
    removes what this call created (``path``, or the contents of a ``path`` that was empty), unless
    ``keep(path)`` says it holds finished work worth resuming (an experiment's finished stages).
    Either way, what was written ends with the modes open()/mkdir() give.
    """
    shown = path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConsaError(f"{what} {path} exists and is not a directory")
    if path.is_symlink() or not path.name:  # publish into the real directory, not over the link, or "."
        path = path.resolve()
    was_empty = not path.exists() or not any(path.iterdir())
    if exists == "empty" and not was_empty:
        raise ConsaError(f"{what} {shown} already exists and is not empty (choose another {what} or remove it)")
    if exists not in ("merge", "replace", "empty"):
        raise ValueError(f"unknown exists policy {exists!r}")
    parents = [p for p in path.parents if not p.exists()]  # deepest first; removed again on failure
    fresh = not path.exists()
    if resumable:
        t0 = time.time() - 0.05  # file-system clocks tick a jiffy behind time.time()
        path.mkdir(parents=True, exist_ok=True)
        try:
            yield path
        except KeyboardInterrupt:
            raise
        except BaseException:
            if was_empty and not (keep is not None and keep(path)):
                for p in [path] if fresh else list(path.iterdir()):
                    _remove(p)
                _rmdirs(parents)
            raise
        finally:
            if path.is_dir():
                ordinary_modes(path, top=False, since=t0)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
        try:
            yield stage
            ordinary_modes(stage)
            _publish(stage, path, exists)
        finally:
            if stage.exists():
                shutil.rmtree(stage)
    except BaseException:
        _rmdirs(parents)
        raise


def has_checkpoint(root: str | os.PathLike) -> bool:
    """Whether a run directory holds a search/pretrain checkpoint (``checkpoint/state.json``) at any
    depth: a failed run that has one is kept for ``--resume`` rather than thrown away."""
    return any(p.parent.name in ("checkpoint", "checkpoint.old") for p in Path(root).rglob("state.json"))


def _publish(stage: Path, path: Path, exists: str) -> None:
    if not path.exists() or not any(path.iterdir()):
        os.replace(stage, path)  # one atomic rename (an empty directory is replaced)
    elif exists == "replace":
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(stage, path)
        shutil.rmtree(old)
    else:
        _move_into(stage, path)


def _rmdirs(dirs: list[Path]) -> None:
    """Remove the (deepest-first) parent directories made for an output that was never published."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def read_json(path: str | os.PathLike, what: str = "file", error: type[ConsaError] = ConsaError, *,
              expect: type | None = None):
    """Parse a JSON file; a missing, unreadable, binary or malformed file is one ``error`` line, and so is
    one whose top-level value is not an ``expect`` (``dict``: the caller reads keys from it)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except UnicodeDecodeError as e:  # a binary or corrupt file: JSON is UTF-8 text
        raise error(f"{what} {path} is not valid JSON (not UTF-8 text: byte {e.start})") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if expect is not None and not isinstance(value, expect):
        kind = "an object" if expect is dict else f"a {expect.__name__}"
        raise error(f"{what} {path} is not valid: its JSON is {type(value).__name__}, not {kind}")
    return value
