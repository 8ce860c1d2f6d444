"""File writing, the ground floor every other module builds on: atomic writes, JSON and text, and multi-file commits.

* :func:`atomic_write` / :func:`write_text` / :func:`write_json`: one file, written to a temp file in the same folder
  and renamed over the target, so a reader (or a process killed mid-write) sees the old file or the new one, never
  half of one.
* :func:`commit`: several files and folders replaced together, with stale ones taken away in the same step. The new
  contents are staged first; a journal (``.commit.json``, written atomically) then lists what moves where; the moves
  follow. A process killed at any point leaves either the old state (no journal yet: the staged files are ignored
  and swept away) or a journal that :func:`recover` rolls forward. Stale paths are moved into ``.stale/`` before the
  new ones land, and only deleted once the commit is complete.

Imports nothing heavy (no torch): the CLI and the version module sit on it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "write_text", "write_json", "read_json", "json_safe", "commit", "recover",
           "staging_path", "JOURNAL", "CorruptFileError"]

JOURNAL = ".commit.json"
_STALE = ".stale"
_STAGE_PREFIX = ".staged-"
_TMP_SUFFIX = ".wfnet-tmp"  # atomic_write's temp files: ".<name>.<random>.wfnet-tmp"


class CorruptFileError(ValueError):
    """A file that wfnet wrote cannot be read back: it is damaged or truncated (a disk fault, a copy cut short, a
    process killed by something that bypassed the atomic writes, an edit by hand). Defined here, with no heavy import,
    so that the CLI can catch it cheaply.

    ``path``, ``what`` (e.g. "filters file") and ``detail`` (the reader's own message) say which file and why; the
    message ends with what to do (``hint``). A ValueError, so code that caught the earlier ValueError keeps working.
    """

    def __init__(self, path, what: str, detail: str, hint: str | None = None):
        self.path, self.what, self.detail = os.fspath(path), what, detail
        self.hint = hint or "delete it and recreate it with the step that wrote it, or restore a good copy"
        super().__init__(f"{self.path}: the {what} is damaged or truncated and cannot be read ({detail}); "
                         f"{self.hint}")

    def __reduce__(self):  # picklable across processes (the keyword-free default would lose the arguments)
        return type(self), (self.path, self.what, self.detail, self.hint)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask sets it, racing other threads)."""
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


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never half."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=_TMP_SUFFIX, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates the file private (0600); give it the mode a plain open() would (0666 minus the umask)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def json_safe(obj):
    """A JSON-safe copy: NaN / inf -> None, tuples -> lists, dict keys -> str, paths -> str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def write_json(path, obj) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`json_safe` for what is converted)."""
    write_text(path, json.dumps(json_safe(obj), indent=2) + "\n")


def read_json(path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------------------------------
# Multi-file commits


def staging_path(root, final: str) -> Path:
    """Where to stage the new content of ``root/final`` (a file or a folder) before :func:`commit`."""
    return Path(root) / (_STAGE_PREFIX + str(final).replace("/", "__"))


def commit(root, new=(), stale=()) -> None:
    """Replace ``root/<final>`` by its staged content for every ``final`` in ``new``, and take every path of
    ``stale`` away, as one step that survives a kill (see the module docstring).

    ``new``: a list of finals staged at :func:`staging_path`, or a dict ``{final: staged}``. Paths are relative to
    ``root``; a stale path that does not exist is ignored. A new folder replaces an existing folder of that name only
    when that folder is also listed in ``stale``.
    """
    root = Path(root)
    if not isinstance(new, dict):
        new = {str(f): str(staging_path(root, f).relative_to(root)) for f in new}
    new = {str(f): str(s) for f, s in new.items()}
    stale = [str(p) for p in stale if (root / p).exists() or (root / p).is_symlink()]
    for f, s in new.items():
        if not (root / s).exists():
            raise FileNotFoundError(f"nothing staged for {root / f} (expected {root / s})")
        if (root / f).is_dir() and f not in stale:
            raise ValueError(f"{root / f} is a folder: list it in stale to replace it")
    write_json(root / JOURNAL, {"new": new, "stale": stale})
    _roll_forward(root)


def _roll_forward(root: Path) -> None:
    journal = read_json(root / JOURNAL)
    quarantine = root / _STALE
    for i, rel in enumerate(journal["stale"]):
        dest = quarantine / str(i)
        if dest.exists() or dest.is_symlink():
            continue  # moved before the kill
        src = root / rel
        if rel in journal["new"] and not (root / journal["new"][rel]).exists():
            continue  # cannot happen (the quarantine outlives the journal); never move a new file away
        if src.exists() or src.is_symlink():
            quarantine.mkdir(exist_ok=True)
            os.replace(src, dest)
    for rel, staged in journal["new"].items():
        if (root / staged).exists():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(root / staged, root / rel)
    _fsync_dir(str(root))
    os.unlink(root / JOURNAL)  # the commit is complete from here on
    _fsync_dir(str(root))
    shutil.rmtree(quarantine, ignore_errors=True)


def recover(root) -> bool:
    """Finish a commit a killed process left half done (roll forward), and sweep what killed processes leave
    behind: staged files of a commit that never started, quarantined stale files, temp files of
    :func:`atomic_write`. Call it only while no other process writes under ``root``. Returns True when there was a
    commit to finish."""
    root = Path(root)
    if not root.is_dir():
        return False
    finished = False
    if (root / JOURNAL).exists():
        _roll_forward(root)
        finished = True
    shutil.rmtree(root / _STALE, ignore_errors=True)
    for p in root.glob(_STAGE_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for p in root.rglob("*" + _TMP_SUFFIX):  # a write killed before its rename
        p.unlink(missing_ok=True)
    return finished
