"""Drop known false alarms from a CLI's stderr, line by line, passing everything else through.

Ray's core worker logs at error level, from C++ straight to file descriptor 2, each time a
restartable actor is created with arguments in the object store: Ray Data's map workers
("Actor with class name: 'MapWorker(...)' ... has constructor arguments in the object store and
max_restarts > 0") at every Ray Data stage, Ray Train's PreemptionWatcher at every training run.
It says such an actor could not be restarted once the owner of those arguments is gone; the owner
is the job's driver (or Ray Train's controller), which lives as long as the actor's job, so the
restart it warns about cannot fail here (https://github.com/ray-project/ray/issues/57733, open;
background in https://github.com/ray-project/ray/issues/53727). A new user reads it as a failure
of the job, so the CLI drops it; any other error line passes.

Python cannot intercept a C++ write to fd 2, so `install()` points fd 2 at a pipe read by a
small child process (this module's `main`) that copies lines to the real stderr, minus the
noise. A child and not a thread: it outlives a crash of the job process and keeps copying until
the last writer closes the pipe, so no traceback is lost.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

NOISE = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: '.*' and ID: '[0-9a-f]+' has constructor arguments "
               rb"in the object store and max_restarts > 0"),
)
_installed = False


def is_noise(line: bytes) -> bool:
    return any(p.search(line) for p in NOISE)


def install() -> None:
    """Route this process's fd 2 (and its children's, from now on) through the filter. Idempotent;
    does nothing when fd 2 cannot be redirected."""
    global _installed
    if _installed:
        return
    try:
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        real = os.dup(2)
        subprocess.Popen([sys.executable, "-u", "-m", "jobs.stderr_filter"], stdin=read_end, stdout=real,
                         close_fds=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        os.dup2(write_end, 2)
        for fd in (read_end, write_end, real):
            os.close(fd)
    except OSError:
        return
    _installed = True


def main() -> None:
    # Ctrl-C reaches the whole foreground group; the job prints its traceback after it, so the
    # filter keeps copying until the pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pending = b""
    while chunk := os.read(0, 1 << 16):
        *lines, pending = (pending + chunk).split(b"\n")
        kept = [line + b"\n" for line in lines if not is_noise(line)]
        # A partial line (a progress bar redrawn with \r) passes at once unless it may be noise,
        # which the core worker writes whole, newline included.
        if pending and b"core_worker" not in pending:
            kept.append(pending)
            pending = b""
        _write_all(b"".join(kept))
    if pending and not is_noise(pending):
        _write_all(pending)


def _write_all(data: bytes) -> None:
    while data:
        data = data[os.write(1, data):]


if __name__ == "__main__":
    main()
