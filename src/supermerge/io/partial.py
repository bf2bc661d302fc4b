"""The writer's temporary folders, ``<parent>/.<name>.partial-<8 hex>``, and their owners.

Each one holds a small JSON record, :data:`OWNER_FILE`, of the process writing it: host,
boot, pid and the process's start time. A later writer to the same output removes the
leftovers of writers that are gone (same host and boot, and the pid is no longer that
process), and leaves alone, with a warning, those of a live writer, of another host and
those without a record (written by an older supermerge, or caught between mkdir and the
record). A record is never trusted to point anywhere: only the folder holding it, whose
name has the pattern above, is ever removed.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

OWNER_FILE = ".supermerge-writer.json"
_SUFFIX = re.compile(r"\.partial-[0-9a-f]{8}")


def make_partial_dir(out: Path, on_error: Callable[[OSError, Path], Exception]) -> Path:
    """Create a new hidden sibling of ``out`` holding this process's owner record; returns it.

    mkdir honours the umask (mkdtemp would not). An OSError is raised as
    ``on_error(exc, path)``; nothing is left behind then. Cost: a mkdir and a small write.
    """
    while True:
        tmp = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise on_error(exc, tmp) from exc
        try:
            (tmp / OWNER_FILE).write_text(json.dumps(_this_process()) + "\n", encoding="utf-8")
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise on_error(exc, tmp / OWNER_FILE) from exc
        return tmp


def release(tmp: Path) -> None:
    """Remove the owner record before the folder is published (raises OSError)."""
    (tmp / OWNER_FILE).unlink(missing_ok=True)


def clean_leftovers(out: Path) -> list[Path]:
    """Remove the partial folders of ``out`` whose writers are gone; returns those removed.

    Logs a warning naming the ones kept (live writer, another host, no record). Cost: a
    listing of ``out``'s parent, a small read and a ``/proc`` look-up per partial folder,
    and the removal of the dead ones.
    """
    removed = []
    for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.partial-*")):
        if not _SUFFIX.fullmatch(folder.name[len(out.name) + 1:]):
            continue
        if folder.is_symlink() or not folder.is_dir():
            continue
        owner = _read_owner(folder)
        state = _writer_state(owner)
        if state == "gone":
            shutil.rmtree(folder, ignore_errors=True)
            if not folder.exists():
                removed.append(folder)
                log.info("removed %s, left by an interrupted writer (pid %s)", folder,
                         owner.get("pid") if owner else "?")
                continue
            state = "undeletable"
        log.warning("kept %s: %s", folder, _KEPT[state].format(**(owner or {})))
    return removed


_KEPT = {
    "live": "another supermerge process (pid {pid}) is writing it now",
    "other host": "written by a process on host {host}, which this one cannot check; "
                  "delete it once that writer is gone",
    "unknown": "no record of its writer (an older supermerge, or a writer just starting); "
               "delete it by hand if no merge to this output is running",
    "undeletable": "its writer is gone but it could not be deleted; delete it by hand",
}


def _this_process() -> dict[str, object]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": pid,
            "start": _start_time(pid)}


def _read_owner(folder: Path) -> dict | None:
    try:
        owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    return owner


def _writer_state(owner: dict | None) -> str:
    """'gone', 'live', 'other host' or 'unknown' for an owner record."""
    if owner is None:
        return "unknown"
    me = _this_process()
    if owner.get("host") != me["host"]:
        return "other host"
    if owner.get("boot") is not None and me["boot"] is not None and owner["boot"] != me["boot"]:
        return "gone"  # this host rebooted since: no process of that boot lives
    pid = owner["pid"]
    if pid <= 0 or not _alive(pid):
        return "gone"
    started = owner.get("start")
    if started is not None and _start_time(pid) not in (None, started):
        return "gone"  # the pid now belongs to another process
    return "live"


def _alive(pid: int) -> bool:
    """True if a process (not a zombie) with this pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    except OSError:
        return True
    return _proc_stat(pid)[0] != "Z"


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), else None."""
    return _proc_stat(pid)[1]


def _proc_stat(pid: int) -> tuple[str | None, int | None]:
    """(state letter, start time) from /proc/<pid>/stat; (None, None) where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None, None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None
