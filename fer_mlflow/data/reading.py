"""The one reader of folders, zips and compressed files, for `clean` (FER2013 sources), `predict`
(photos and videos) and `score` (its Spark listing uses the same filters and limits).

One set of rules, so that the readers cannot drift apart:

- Names: every entry is named by `safe_name`, relative and without ``..``, drive letters or
  backslashes, so that a name can be used to build a path under an output folder (a zip member
  called ``/tmp/x/a.jpg`` or ``../../a.jpg`` stays inside it).
- Filters: `junk` leaves out the files operating systems leave beside images (hidden files,
  ``__MACOSX/``, ``Thumbs.db``, ``desktop.ini``).
- Limits: a photo is at most `MAX_FILE_BYTES`, a video at most `MAX_VIDEO_BYTES`, a CSV at most
  `MAX_CSV_BYTES`; anything compressed (a zip member, a gzipped CSV) inflates to at most its limit
  and at most `MAX_RATIO` times its compressed size. The bound is enforced on the bytes actually
  inflated, not only on the size a header declares.

The source is only ever read. Errors about one file are `OSError` naming the reason (the callers
skip that file and go on); errors about the whole source are `DataError`.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from fer_mlflow.errors import DataError

MAX_FILE_BYTES = 50_000_000  # a photo or face image; larger files and zip members are skipped unread
MAX_VIDEO_BYTES = 4_000_000_000  # a video inside a zip, copied once to a temporary file to be decoded
MAX_CSV_BYTES = 1_000_000_000  # fer2013.csv is 301 MB; gzipped, it inflates to no more than this
# Inflated over compressed size. Photos barely compress (JPEG, PNG: about 1), FER2013's CSV about
# 3; deflate's own limit is 1032, reached only by repeated bytes: a zip bomb.
MAX_RATIO = 100
RATIO_FROM = 1_000_000  # the ratio is checked past this many inflated bytes: small files may compress well
JUNK_NAMES = ("__MACOSX", "thumbs.db", "desktop.ini")
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


def junk(name: str) -> bool:
    """Whether a file or folder name is one operating systems leave beside images: hidden ones
    (.DS_Store, ._*), __MACOSX, Thumbs.db, desktop.ini."""
    return name.startswith(".") or name.lower() in (n.lower() for n in JUNK_NAMES)


def safe_name(name: str) -> PurePosixPath:
    """`name` (a zip member's or a relative path) as a relative POSIX path that stays inside any
    folder it is joined to: backslashes read as separators, a drive letter and a leading slash
    dropped, and ``.``/``..`` parts removed (as `zipfile.ZipFile.extract` does)."""
    name = _DRIVE.sub("", name.replace("\\", "/"))
    parts = [part for part in name.split("/") if part not in ("", ".", "..")]
    return PurePosixPath(*parts) if parts else PurePosixPath("unnamed")


def printable(name: str) -> str:
    """A file name as text that can be written anywhere: bytes that are not UTF-8 (kept by Python
    as surrogates) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@dataclass(frozen=True)
class Entry:
    """One file of a `Tree`: its safe `name`, and where it is (a file, or a member of the zip)."""

    name: PurePosixPath
    path: Path
    member: zipfile.ZipInfo | None = None


class Tree:
    """A folder (walked recursively), a zip (read member by member, never extracted) or one file,
    opened for reading; a context manager. `entries`: its files, junk left out, in name order.

    Symlinked folders are followed (a class folder is often a link to where the images are); a link
    back into a folder being walked is a loop, refused as a DataError."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._archive: zipfile.ZipFile | None = None
        self._copies: dict[int, Path | OSError] = {}  # zip members copied to disk, or why they could not be
        self._folder: tempfile.TemporaryDirectory | None = None
        if self.path.is_dir():
            found = list(_walk(self.path))
        elif self.path.suffix.lower() == ".zip":
            found = self._members()
        else:
            found = [Entry(PurePosixPath(printable(self.path.name)), self.path)]
        self.entries = sorted(found, key=lambda entry: entry.name.parts)

    def _members(self) -> list[Entry]:
        try:
            self._archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as error:
            raise DataError(f"{self.path} is not a readable zip file ({error}); re-download it, or give "
                            "a folder") from error
        members = [Entry(safe_name(info.filename), self.path, info) for info in self._archive.infolist()
                   if not info.is_dir()]
        # Judged by the safe name: a raw part ".." would read as a hidden file.
        return [entry for entry in members if not any(junk(part) for part in entry.name.parts)]

    def read(self, entry: Entry, limit: int | None = None) -> bytes:
        """The bytes of `entry`, at most `limit` of them (default `MAX_FILE_BYTES`; inflated, for a
        zip member); OSError naming why not: over a limit, a zip bomb, damaged, not a regular file."""
        limit = limit or MAX_FILE_BYTES
        if entry.member is None:
            return read_regular(entry.path, limit)
        with self._open_member(entry.member, limit) as stream:
            return _bounded(stream, entry.member.compress_size, limit, "inflates")

    def local(self, entry: Entry, limit: int | None = None) -> Path:
        """A file on disk with the bytes of `entry` (for readers that need a path, as OpenCV does):
        the file itself, or a zip member copied once (at most `limit` bytes, default
        `MAX_VIDEO_BYTES`) to a temporary folder removed on `close`."""
        limit = limit or MAX_VIDEO_BYTES
        if entry.member is None:
            return entry.path
        # By the member's place in the zip: two members can have one safe name (x.mp4, ../x.mp4).
        key = entry.member.header_offset
        if key not in self._copies:
            if self._folder is None:
                self._folder = tempfile.TemporaryDirectory(prefix="fer-member-")
            target = Path(self._folder.name) / f"{len(self._copies)}{entry.name.suffix}"
            try:
                with self._open_member(entry.member, limit) as stream, open(target, "wb") as out:
                    _bounded(stream, entry.member.compress_size, limit, "inflates", out)
                self._copies[key] = target
            except OSError as error:  # kept: a member refused once is not inflated again
                target.unlink(missing_ok=True)
                self._copies[key] = error
        if isinstance(self._copies[key], OSError):
            raise self._copies[key]
        return self._copies[key]

    def _open_member(self, info: zipfile.ZipInfo, limit: int) -> BinaryIO:
        _check_declared(info.file_size, info.compress_size, limit)
        try:
            return self._archive.open(info)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError) as error:  # RuntimeError: encrypted
            raise OSError(f"damaged in the zip ({error})") from error

    def close(self) -> None:
        if self._archive is not None:
            self._archive.close()
        if self._folder is not None:
            self._folder.cleanup()
            self._folder, self._copies = None, {}

    def __enter__(self) -> Tree:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _walk(root: Path) -> Iterator[Entry]:
    for directory, subdirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(directory)
        if any(os.path.realpath(parent) == real for parent in Path(directory).parents):
            raise DataError(f"{directory} is a symlink loop (it leads back to a folder above it); "
                            "remove the link or point data at a folder without it")
        subdirs[:] = sorted(d for d in subdirs if not junk(d))
        for name in sorted(files):
            if not junk(name):
                full = Path(directory) / name
                yield Entry(safe_name(printable(full.relative_to(root).as_posix())), full)


def read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of `path` if it is a regular file (a link to one is fine) of at most `limit`
    bytes; OSError naming why not. What is not a regular file (a FIFO, a device) is refused rather
    than opened, since reading one can block for ever."""
    limit = limit or MAX_FILE_BYTES
    info = path.stat()
    if not stat.S_ISREG(info.st_mode):
        raise OSError(f"not a regular file (mode {stat.filemode(info.st_mode)})")
    if info.st_size > limit:
        raise OSError(f"{info.st_size / 1e6:g} MB, over the {limit / 1e6:g} MB limit")
    with open(path, "rb") as handle:
        return _bounded(handle, None, limit, "grew to")  # it may grow while it is read


def gunzip(raw: bytes, limit: int | None = None) -> bytes:
    """`raw` (gzip, possibly several members) inflated within `limit` bytes and `MAX_RATIO` times
    its size (`limit` default: `MAX_CSV_BYTES`); OSError naming the bound it broke, or the damage."""
    limit = limit or MAX_CSV_BYTES
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
        return _bounded(stream, len(raw), limit, "inflates")


def _check_declared(size: int, compressed: int, limit: int) -> None:
    """Refuse a member from its header before inflating anything."""
    _check_inflated(size, compressed, limit, "inflates")


def _check_inflated(size: int, compressed: int | None, limit: int, verb: str) -> None:
    # The ratio first: a bomb is named as one, whatever its size.
    if compressed is not None and size > RATIO_FROM and size > MAX_RATIO * max(compressed, 1):
        raise OSError(f"{verb} to over {MAX_RATIO} times its compressed size ({compressed} bytes): "
                      "a zip bomb, not data")
    if size > limit:
        raise OSError(f"{verb} to over the {limit / 1e6:g} MB limit")


def _bounded(stream: BinaryIO, compressed: int | None, limit: int, verb: str, out: BinaryIO | None = None) -> bytes:
    """Read `stream` chunk by chunk, refusing it (OSError) as soon as it passes a bound; into `out`
    when given (and b"" returned), else returned."""
    chunks, total = [], 0
    try:
        while chunk := stream.read(_CHUNK):
            total += len(chunk)
            _check_inflated(total, compressed, limit, verb)
            if out is None:
                chunks.append(chunk)
            else:
                out.write(chunk)
    except (zipfile.BadZipFile, EOFError, zlib.error) as error:  # a bad CRC, a cut stream
        raise OSError(f"damaged ({error})") from error
    return b"".join(chunks)
