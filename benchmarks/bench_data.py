"""Reading and cleaning FER2013: median wall time of each step over several runs.

Usage: python benchmarks/bench_data.py [path/to/fer2013-public.zip] [--repeats 3]
The baseline is the bare cost of decoding every JPEG of the zip with PIL.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
import zipfile

import numpy as np
from PIL import Image

from fer_mlflow.data.rules import clean
from fer_mlflow.data.sources import read_source


def median_seconds(fn, repeats: int):
    samples, value = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        value = fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), value


def decode_only(path: str) -> int:
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith(".jpg")]
        for name in names:
            np.asarray(Image.open(io.BytesIO(archive.read(name))).convert("L"))
    return len(names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zip", nargs="?", default="../shared/data/fer2013-public.zip")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    decode_s, count = median_seconds(lambda: decode_only(args.zip), args.repeats)
    read_s, (dataset, _) = median_seconds(lambda: read_source(args.zip), args.repeats)
    clean_s, result = median_seconds(lambda: clean(dataset), args.repeats)
    print(json.dumps({
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "repeats": args.repeats,
        "images": count, "pil_decode_only_s": round(decode_s, 2), "read_source_s": round(read_s, 2),
        "clean_s": round(clean_s, 2), "removed": {k: len(v) for k, v in result.removed.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
