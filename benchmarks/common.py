"""What the benchmark scripts share: their ``--graph NAME=FOLDER`` arguments and the provenance of a result file."""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def graph_folders(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, Path]:
    """``NAME=FOLDER`` arguments as ``{name: folder}``; a usage error for one without ``=`` or ``model.onnx``."""
    graphs = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or not Path(folder, "model.onnx").is_file():
            parser.error(f"--graph {item!r}: give NAME=FOLDER, a folder holding model.onnx")
        graphs[name] = Path(folder)
    return graphs


def provenance(script: str, argv: Sequence[str] | None, device: str = "cpu") -> dict[str, Any]:
    """The command, date, machine, device and commit a result file records."""
    from fwsvd_deploy.validators.latency import environment

    env = environment(device)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    return {"command": " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{env['cpu']}, {env['cores']} cores, {env['platform']}", "device": device, "commit": commit}


class PeakRSS:
    """The peak resident memory of this process while the block runs (sampled every 10 ms from /proc), in bytes.

    ``resource.getrusage``'s maximum covers the whole process life, so one process could measure only its first
    phase; the sampler reads the current RSS instead and keeps the largest value seen inside the block.
    """

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = None
        self._thread = None

    @staticmethod
    def current() -> int:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakRSS:
        import threading

        self.peak = self.current()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, self.current())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())
