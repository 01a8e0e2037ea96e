"""Reading what the `predict` stage is given: a photo, a folder of photos and videos (searched
recursively), a zip of them (read without extracting) or a video, as a stream of RGB images, each
with the file (and, for video, the frame and time) it came from.

Folders and zips are read by `reading.Tree`, the reader `clean` uses too: the same junk filter,
names made safe to write under an output folder, and the same limits (a photo's bytes, a zip
member's inflation, a video copied out of a zip once). Files are chosen by suffix
(`PHOTO_SUFFIXES`, `VIDEO_SUFFIXES`). Photos open as the served model opens them
(`images.open_rgb`: the same formats and limits). Videos are read with OpenCV's bundled FFmpeg,
every `every`-th frame analysed. A file that cannot be read is skipped with a warning and counted,
so that one bad file does not end a long job.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from fer_mlflow.errors import DataError
from fer_mlflow.data.decode import MAX_PIXELS, open_rgb
from fer_mlflow.data.reading import Entry, Tree

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv")
# every=auto analyses this many frames per second of video: a minute of 30 fps video in well under
# a minute on 2 cores with MTCNN (3 a second took 56 s there: BENCHMARKS.md).
FRAMES_PER_SECOND = 2


@dataclass(frozen=True)
class Source:
    """One photo or video: `name` as reported (relative to the folder or zip given, made safe by
    `reading.safe_name`), and the `tree` and `entry` its bytes are read from."""

    name: str
    kind: str  # "photo" or "video"
    entry: Entry
    tree: Tree = field(compare=False, repr=False)


@dataclass(frozen=True)
class Still:
    """An image to analyse: a photo, or frame `frame` (at `time_s` seconds) of a video."""

    source: Source
    rgb: np.ndarray
    frame: int | None = None
    time_s: float | None = None


@dataclass
class VideoInfo:
    """What OpenCV says of a video, and which frames are analysed (every `every`-th from 0)."""

    fps: float
    frame_count: int  # from the container's header: an estimate for some formats
    width: int
    height: int
    every: int

    @property
    def analysed(self) -> int:
        return math.ceil(self.frame_count / self.every)


def kind_of(name: str) -> str | None:
    """"photo", "video" or None, by the file name's suffix."""
    suffix = PurePosixPath(name).suffix.lower()
    return "photo" if suffix in PHOTO_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else None


class Found:
    """The photos and videos `find` found, in name order (`sources`); a context manager that closes
    the zip they are read from and removes the copies made of its videos."""

    def __init__(self, tree: Tree):
        self.tree = tree
        self.sources = [Source(entry.name.as_posix(), kind_of(entry.name.name), entry, tree)
                        for entry in tree.entries if kind_of(entry.name.name)]

    def __enter__(self) -> Found:
        return self

    def __exit__(self, *exc) -> None:
        self.tree.close()


def find(path: str | Path) -> Found:
    """The photos and videos at `path` (a photo, a video, a folder searched recursively, or a zip).
    DataError, naming the path and the fix, when it is missing or holds none."""
    path = Path(path).expanduser()
    expected = f"a photo ({', '.join(PHOTO_SUFFIXES)}), a video ({', '.join(VIDEO_SUFFIXES)}), " \
               "a folder of them or a .zip of them"
    if not path.exists():
        raise DataError(f"input {path} does not exist; give {expected}")
    if not (path.is_dir() or path.suffix.lower() == ".zip" or kind_of(path.name)):
        raise DataError(f"input {path} is not {expected} (judged by its suffix)")
    found = Found(Tree(path))
    if not found.sources:
        found.tree.close()
        raise DataError(f"no photos or videos in {path}; give {expected}")
    return found


def read_photo(source: Source, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The photo as uint8 RGB (H x W x 3), upright; DataError if it cannot be read."""
    try:
        data = source.tree.read(source.entry)
    except OSError as error:  # vanished, not a regular file, over the limit, a zip bomb, damaged
        raise DataError(f"{source.name} could not be read ({error.strerror or error})") from error
    try:
        return open_rgb(data, max_pixels=max_pixels)
    except DataError as error:  # its message names "image 0": name the file instead
        raise DataError(f"{source.name}: {str(error).removeprefix('image 0 ')}") from error


class Video:
    """An open video (a context manager): `info`, and `frames()` to read it. DataError on opening
    a file OpenCV cannot decode."""

    def __init__(self, source: Source, every: int | None = None):
        import cv2

        self.source = source
        try:  # OpenCV reads files: a zip member is copied out once, for every later reading too
            self._path = source.tree.local(source.entry)
        except OSError as error:
            raise DataError(f"video {source.name} could not be read ({error.strerror or error})") from error
        self._capture = cv2.VideoCapture(str(self._path))
        ok = self._capture.isOpened() and self._capture.grab()
        if not ok:
            self.close()
            raise DataError(f"video {source.name} could not be read (OpenCV's FFmpeg decoded no frame); "
                            f"give a video it reads ({', '.join(VIDEO_SUFFIXES)}), not a damaged or empty file")
        fps = float(self._capture.get(cv2.CAP_PROP_FPS) or 0.0)
        self.info = VideoInfo(
            fps=fps, frame_count=max(1, int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)),
            width=int(self._capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(self._capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            every=every or every_for(fps))
        self._capture.release()

    def frames(self, analysed_only: bool = True) -> Iterator[tuple[int, float, np.ndarray | None]]:
        """(frame index, time in seconds, RGB) for each frame from the first: every `info.every`-th
        decoded, the others skipped (None) unless `analysed_only` is False, when all are decoded."""
        import cv2

        capture = cv2.VideoCapture(str(self._path))
        try:
            index = 0
            while capture.grab():
                wanted = index % self.info.every == 0
                if wanted or not analysed_only:
                    ok, bgr = capture.retrieve()
                    if ok:
                        yield index, self.time_of(index), cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                index += 1
        finally:
            capture.release()

    def time_of(self, index: int) -> float:
        return index / self.info.fps if self.info.fps > 0 else float("nan")

    def close(self) -> None:
        """Nothing to release: the capture is closed once read, a copy lives as long as its `Found`."""

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def every_for(fps: float) -> int:
    """every=auto: analyse `FRAMES_PER_SECOND` frames per second of video (every 15th at 30 fps)."""
    return max(1, round(fps / FRAMES_PER_SECOND)) if fps > 0 else 1


@dataclass
class Reader:
    """The stills of `sources` in order: each photo, and each analysed frame of each video.
    Unreadable files are skipped with one warning each and listed in `skipped`."""

    sources: list[Source]
    every: int | None = None
    max_pixels: int = MAX_PIXELS
    skipped: list[str] = field(default_factory=list)
    videos: dict[str, VideoInfo] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Still]:
        for source in self.sources:
            try:
                if source.kind == "photo":
                    yield Still(source, read_photo(source, self.max_pixels))
                    continue
                with Video(source, self.every) as video:
                    self.videos[source.name] = video.info
                    for index, time_s, rgb in video.frames():
                        yield Still(source, rgb, index, time_s)
            except DataError as error:
                log.warning("skipped %s", error)
                self.skipped.append(source.name)
