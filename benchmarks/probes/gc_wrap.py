"""Run the `fastgate` CLI with garbage-collector accounting (a probe for benchmarks/w2_probe.py).

    FG_GC_STATS=/tmp/gc.json python benchmarks/probes/gc_wrap.py run -c gateway.yaml

Installs a ``gc.callbacks`` hook timing every collection per generation (perf_counter, like
the gateway's verify timing) and a daemon thread that writes the running totals to
``FG_GC_STATS`` every 0.1 s: ``{"t": ..., "gens": [[count, seconds, collected], x3]}``.
``FG_GC_MODE``: ``normal`` (default), ``disable`` (gc.disable() at start) or ``freeze``
(gc.freeze() ``FG_GC_FREEZE_AFTER`` seconds after start, default 3: the start-up heap moves
to the permanent generation, so full collections no longer traverse it). Nothing of fastgate
is patched: this only observes the interpreter the CLI runs in.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time

_gens = [[0, 0.0, 0] for _ in range(3)]
_t0 = [0.0]


def _cb(phase: str, info: dict[str, int]) -> None:
    if phase == "start":
        _t0[0] = time.perf_counter()
    else:
        g = _gens[info["generation"]]
        g[0] += 1
        g[1] += time.perf_counter() - _t0[0]
        g[2] += info.get("collected", 0)


def _writer(path: str, mode: str, freeze_after: float) -> None:
    start = time.monotonic()
    frozen = False
    while True:
        time.sleep(0.1)
        if mode == "freeze" and not frozen and time.monotonic() - start >= freeze_after:
            gc.freeze()
            frozen = True
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"t": time.time(), "gens": _gens, "mode": mode, "frozen": frozen,
                       "freeze_count": gc.get_freeze_count(), "counts": gc.get_count()}, f)
        os.replace(tmp, path)


def main() -> int:
    path = os.environ.get("FG_GC_STATS")
    mode = os.environ.get("FG_GC_MODE", "normal")
    if mode == "disable":
        gc.disable()
    gc.callbacks.append(_cb)
    if path:
        threading.Thread(target=_writer, args=(path, mode,
                                                float(os.environ.get("FG_GC_FREEZE_AFTER", 3))),
                         daemon=True).start()
    from fastgate.cli import main as cli_main

    sys.argv[0] = "fastgate"
    return int(cli_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
