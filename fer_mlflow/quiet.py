"""TensorFlow's C++ start-up lines, kept off a stage's output: the CLI calls `quiet_tensorflow` first.

TensorFlow 2.21 writes its first lines (oneDNN on, no CUDA driver, "All log messages before
absl::InitializeLog() ...") through absl before its own log level is read, so
``TF_CPP_MIN_LOG_LEVEL`` cannot silence them: they are written straight to file descriptor 2.
Where no terminal is attached, that descriptor becomes a pipe whose reader drops these known
lines and passes every other byte on, so the project's own lines, errors and tracebacks still
get through. On a terminal only the environment variables apply (a pipe would hold back progress
bars until their line ends). ``FER_VERBOSE=1`` leaves everything as TensorFlow writes it.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading

# The known lines, whole: absl's header (level, date, time, thread, file.cc:line]) and the file.
NOISE = re.compile(
    rb"(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ (port|cudart_stub|cpu_feature_guard|cuda_platform|cuda_dnn|cuda_fft|cuda_blas"
    rb"|cuda_executor|cuda_diagnostics|computation_placer|dso_loader)\.cc:\d+\] .*"
    rb"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\."
    rb"|TF-TRT Warning: Could not find TensorRT)\r?\n?"
)
_pump: threading.Thread | None = None


def quiet_tensorflow() -> None:
    """Keep TensorFlow's C++ start-up lines off this process's stderr (see the module's docstring);
    call before TensorFlow is imported. A value the user set for an environment variable wins."""
    if os.environ.get("FER_VERBOSE") == "1":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the lines logged after absl's start
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # multi-worker training's gRPC start-up
    if not os.isatty(2):
        filter_stderr(NOISE)


def filter_stderr(drop: re.Pattern) -> None:
    """Send file descriptor 2 through a pipe whose reader drops the lines `drop` matches whole."""
    global _pump
    if _pump is not None:
        return
    sys.stderr.flush()
    reader, writer = os.pipe()
    target = os.dup(2)
    os.dup2(writer, 2)
    os.close(writer)
    _pump = threading.Thread(target=_forward, args=(reader, target, drop), name="stderr-filter", daemon=True)
    _pump.start()
    atexit.register(_restore, target)


def _forward(reader: int, target: int, drop: re.Pattern) -> None:
    with os.fdopen(reader, "rb", buffering=0) as source:
        pending = b""
        while chunk := source.read(65536):
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()
            _write(target, b"".join(line + b"\n" for line in lines if not drop.fullmatch(line + b"\n")))
        if not drop.fullmatch(pending):
            _write(target, pending)


def _write(target: int, data: bytes) -> None:
    while data:
        data = data[os.write(target, data):]


def _restore(target: int) -> None:
    """At exit: stderr back to where it went, and what the pipe still holds written there first."""
    sys.stderr.flush()
    os.dup2(target, 2)  # the pipe's last writer in this process closes: its reader sees the end
    if _pump is not None:
        # A child that inherited the pipe (Spark's JVM) may hold it open a little longer.
        _pump.join(timeout=5)
