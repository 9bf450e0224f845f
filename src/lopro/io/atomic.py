"""One way to write a file so that a crash never leaves it half written: temp file, fsync, rename."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, data: bytes | str, writer=None) -> Path:
    """Write `data` (or call `writer(tmp_path)`) to a temporary sibling, fsync it, rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if writer is not None:
            writer(tmp)
        else:
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)
    return path


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove temporary siblings of `out` (``.NAME.tmp-PID-*``, ``.NAME.old-PID``) whose process is dead."""
    if not out.parent.is_dir():
        return
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = p.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind in ("tmp", "old") and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def is_lopro_output(folder: Path) -> bool:
    """A folder lopro wrote: a checkpoint (fake-quantized ones carry report.json), an export, a compare cache."""
    for name, key in (("config.json", "quantization_config"), ("report.json", "summary"),
                      ("export.json", None), ("results.json", "entries")):
        path = folder / name
        if path.is_file():
            try:
                body = json.loads(path.read_text())
            except (ValueError, OSError):
                continue
            if key is None or (isinstance(body, dict) and key in body and
                               (key != "quantization_config" or body[key].get("quant_method") == "lopro")):
                return True
    return False


_SEEN: dict[Path, frozenset] = {}  # output folder -> the names it held when its run was checked


def check_out_folder(out: str | Path, overwrite: bool) -> Path:
    """Refuse an output folder that cannot or must not be written, before any work is done.

    Refused: a file, the current folder or one above it, a non-empty folder without `overwrite`, with
    `overwrite` anything lopro did not write (named), a parent that cannot be written. Stale temporary
    folders of dead runs beside it are removed. What `out` holds now is remembered, so that publishing
    refuses to delete anything that appears in it during the run.
    """
    out = Path(out)
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == here or target in here.parents:
        raise FileExistsError(f"--out {out} is the current folder or one above it; choose a new folder")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder; choose another --out (--overwrite replaces only "
                              "folders lopro wrote)")
    names = frozenset(p.name for p in out.iterdir()) if out.is_dir() else frozenset()
    if names and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    if names and not is_lopro_output(out):
        shown = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise FileExistsError(f"--overwrite replaces only folders lopro wrote, and {out} holds other files "
                              f"({shown}); move them away or choose another --out")
    anchor = target.parent
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir() or not os.access(anchor, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot create {out}: {anchor} is not a writable folder; choose another --out")
    _clean_stale(out)
    _SEEN[target] = names
    return out


def check_unchanged(out: Path) -> None:
    """Before replacing `out`: nothing appeared in it since its run was checked (a second writer, a user)."""
    before = _SEEN.get(out.resolve())
    now = frozenset(p.name for p in out.iterdir()) if out.is_dir() else frozenset()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} became a file during the run; the finished output was not moved there")
    new = sorted(now - (before or frozenset()))
    if new or (before is None and now and not is_lopro_output(out)):
        raise FileExistsError(f"{out} changed during the run ({', '.join(new[:5]) or 'foreign files'} appeared): "
                              "nothing was replaced; the finished output was not published")


def publish(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, replacing what `out` holds (checked at the start of the run
    by check_out_folder, and again here: nothing that appeared since is deleted)."""
    check_unchanged(out)
    old = None
    try:
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def write_folder_atomically(out: Path, write) -> None:
    """Build the folder under a temporary name, then swap it in: never a half-written folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        write(tmp)
        try:
            publish(tmp, out)
        except FileExistsError as exc:  # something appeared at `out`: keep the finished work beside it
            kept = out.with_name(f".{out.name}.kept-{os.getpid()}")
            os.replace(tmp, kept)
            raise FileExistsError(f"{exc}; it is kept in {kept}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
