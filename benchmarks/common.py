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
