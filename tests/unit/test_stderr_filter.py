"""The CLI's stderr filter: Ray's known false alarm is dropped, everything else passes in order,
partial lines pass at once, and a crash's traceback is not lost."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT

NOISE = ("[2026-12-06 06:39:13,290 E 13251 13251] core_worker.cc:2465: Actor with class name: "
         "'MapWorker(MapBatches(ShardCaptionStage))' and ID: '268119daa101c6bb2e75fb6201000000' has constructor "
         "arguments in the object store and max_restarts > 0. If the arguments in the object store go out of scope "
         "or are lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more "
         "details.\n")
TRAIN_NOISE = NOISE.replace("'MapWorker(MapBatches(ShardCaptionStage))'", "'PreemptionWatcher'")

SCRIPT = f"""
import os, sys
from jobs import stderr_filter
stderr_filter.install()
stderr_filter.install()  # idempotent
os.write(2, b"before\\n")
os.write(2, {NOISE.encode()!r})  # what the C++ core worker writes, in one write
os.write(2, {TRAIN_NOISE.encode()!r})  # the same for Ray Train's actor
os.write(2, b"progress 1/2\\r")
os.write(2, b"[2026-12-06 06:39:14,000 E 1 1] core_worker.cc:99: a real error\\n")
print("python stderr", file=sys.stderr, flush=True)
raise SystemExit("crashed: " + "x" * 100000)
"""


def test_the_filter_drops_the_false_alarm_and_keeps_the_rest():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "has constructor arguments" not in err
    assert err.startswith("before\nprogress 1/2\r[2026-12-06 06:39:14,000 E 1 1] core_worker.cc:99: a real error\n"
                          "python stderr\ncrashed: "), err[:500]
    assert err.rstrip("\n").endswith("x" * 100000)  # the whole message, though the job process is gone
