"""`glmkit cache [list]`, `glmkit cache clean [--all] [--yes]`: what glmkit keeps in its cache directory
(GLMKIT_CACHE, else ~/.cache/glmkit), how big it is, and what a start still needs.

`list` marks what a start with no flags loads on this machine. `clean` removes what no start needs: unfinished
builds of killed processes, the assembled default GGUF, default-model forms other than the one loaded here (a
flag that asks for one again rebuilds it), conversions whose GGUF file is gone or changed, and the layout of
older glmkit versions. It keeps conversions of GGUF files that still exist, builds in progress, and anything it
does not recognise. `clean --all` removes everything. Knows the cache's layout (models/), not torch (imported only
on a CPU with bf16 instructions, to see whether a GPU decides the default start).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import GlmkitError


@dataclass
class Entry:
    path: Path
    size: int
    keep: bool          # `clean` leaves it
    note: str
    in_use: bool = False  # what a start with no flags loads on this machine


def add_arguments(p) -> None:
    p.add_argument("action", nargs="?", default="list", choices=("list", "clean"), metavar="ACTION",
                   help="list (the default) or clean")
    p.add_argument("--all", action="store_true", help="clean: remove everything in the cache")
    p.add_argument("--yes", action="store_true", help="clean --all: do not ask for confirmation")


def human(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def disk_size(path: Path) -> int:
    if not path.is_dir() or path.is_symlink():
        return path.lstat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # removed while we walk (a build finishing)
                pass
    return total


def _classify(path: Path, start_dir: Path) -> tuple[bool, str, bool]:
    """(keep, note, in_use) for one entry of converted/ or models/."""
    from ..models import default
    from ..models.gguf import CONVERTED_MARKER, SCRATCH_NAME, is_current_conversion, pid_alive

    scratch = SCRATCH_NAME.fullmatch(path.name)
    if scratch:
        pid = int(scratch["pid"])
        if pid_alive(pid):
            return True, f"being built by process {pid}", False
        return False, f"unfinished build of a killed process (pid {pid})", False
    if path == start_dir:
        return True, "default model: loaded by a start with no flags on this machine", True
    if path == default.float_dir():
        if not default.is_built(start_dir):
            return True, f"default model, float32: the next start makes {start_dir.name} from it", False
        return False, f"default model, float32: starts here load {start_dir.name}", False
    if path.name.startswith(default.float_dir().name + "-"):
        tag = path.name.removeprefix(default.float_dir().name + "-")
        return False, f"default model, {tag} copy: made again if a flag asks for it", False
    if path == default.gguf_path():
        return False, "default model GGUF: assembled again from the installed parts when needed", False
    if _marker(path) == str(default.gguf_path()):  # earlier glmkit builds keyed it by the GGUF file's path and time
        return False, f"default model, float32, from an older glmkit (now {default.float_dir().name})", False
    if is_current_conversion(path):
        return True, f"conversion of {_marker(path)}", False
    if (path / CONVERTED_MARKER).is_file():
        return False, "conversion of a GGUF file that is gone or changed, or from an older glmkit", False
    if path.parent.name == "converted":
        base = next((b for b in path.parent.iterdir() if path.name.startswith(b.name + "-")
                     and is_current_conversion(b)), None)
        if base is not None:
            return True, f"quantized copy of {base.name}", False
        return False, "quantized copy of a stale conversion, or from an older glmkit", False
    return True, "not recognised; left alone (clean --all removes it)", False


def _marker(path: Path) -> str | None:
    from ..models.gguf import CONVERTED_MARKER

    try:
        return (path / CONVERTED_MARKER).read_text().strip()
    except OSError:
        return None


def entries(root: Path) -> list[Entry]:
    from ..models.default import default_start_dir

    start_dir = default_start_dir()
    found = []
    for top in sorted(root.iterdir()) if root.is_dir() else []:
        children = sorted(top.iterdir()) if top.name in ("converted", "models") and top.is_dir() else [top]
        for path in children:
            keep, note, in_use = _classify(path, start_dir)
            found.append(Entry(path, disk_size(path), keep, note, in_use))
    return found


def list_cache(root: Path) -> int:
    found = entries(root)
    print(f"glmkit cache: {root}" + ("" if found else " (empty)"))
    if not found:
        return 0
    width = max((len(str(e.path.relative_to(root))) for e in found), default=0)
    for e in found:
        mark = "*" if e.in_use else ("-" if not e.keep else " ")
        print(f"{mark} {human(e.size):>9}  {str(e.path.relative_to(root)):<{width}}  {e.note}")
    total, freeable = sum(e.size for e in found), sum(e.size for e in found if not e.keep)
    print(f"  {human(total):>9}  total; * loaded by a start with no flags, - removed by `glmkit cache clean` "
          f"({human(freeable)})")
    return 0


def clean(root: Path, everything: bool, yes: bool) -> int:
    from ..models.gguf import remove_path

    if everything:  # whole top-level folders, so the cache is left empty
        doomed = [Entry(p, disk_size(p), False, "") for p in (sorted(root.iterdir()) if root.is_dir() else [])]
    else:
        doomed = [e for e in entries(root) if not e.keep]
    if everything and doomed and not yes:
        if not sys.stdin.isatty():
            raise GlmkitError(f"clean --all removes everything in {root}; standard input is not a terminal to "
                              "confirm on, so add --yes")
        answer = input(f"remove everything in {root} ({human(sum(e.size for e in doomed))})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 0
    for e in doomed:
        remove_path(e.path)
        print(f"removed {e.path.relative_to(root)} ({human(e.size)})")
    print(f"freed {human(sum(e.size for e in doomed))} in {root}")
    return 0


def main(args) -> int:
    from ..models.gguf import cache_root

    root = cache_root()
    if args.action == "list":
        if args.all or args.yes:
            raise GlmkitError(f"{'--all' if args.all else '--yes'} only applies to `glmkit cache clean`")
        return list_cache(root)
    return clean(root, args.all, args.yes)
