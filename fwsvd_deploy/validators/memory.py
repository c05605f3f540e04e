"""Model size on disk, parameter count, and the peak memory of a session measured in a separate process."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import DeviceUnavailableError, ExportError
from ..exporters.quantize import weight_bytes
from ..exporters.runtime import ONNX_FILE, require_provider
from .latency import synthetic_token

# Runs in a fresh interpreter so that nothing else in this process inflates the peak.
_PROBE = r"""
import json, resource, sys
import numpy as np
import onnxruntime as ort
path, device, batch, seq, threads, token = (sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                            int(sys.argv[5]), int(sys.argv[6]))
# a decoder: {"past": {input: [kv_heads, head_dim, dtype]}, "new_tokens": N} -- an empty past, then N decode steps
decoder = json.loads(sys.argv[7]) if len(sys.argv) > 7 else {"past": {}, "new_tokens": 0}
def status_mb(field):
    # VmHWM/VmRSS belong to this process image; getrusage's ru_maxrss would inherit the parent's peak at fork
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    raise OSError(field)
def rss_peak_mb():
    try:
        return status_mb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
def rss_now_mb():
    try:
        return status_mb("VmRSS")
    except OSError:
        return rss_peak_mb()
def device_mb():
    # this process's own device memory (NVML's per-process accounting); the whole device's use as a fallback,
    # read before and after the session so that the difference is the session's
    import os
    import pynvml
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
            return proc.usedGpuMemory / 2**20, "process"
    return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20, "device"
device_before = None
if device != "cpu":
    try:
        device_before = device_mb()
    except Exception:
        pass
before = rss_now_mb()
options = ort.SessionOptions()
options.intra_op_num_threads = threads
options.log_severity_level = 3
providers = {"cuda": ["CUDAExecutionProvider"], "cpu": ["CPUExecutionProvider"],
             "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"]}[device]
session = ort.InferenceSession(path, options, providers=providers)
if session.get_providers()[0] != providers[0]:
    sys.exit(f"{providers[0]} could not start (ONNX Runtime fell back to {', '.join(session.get_providers())})")
loaded = rss_peak_mb()
feed = {}
for inp in session.get_inputs():
    if inp.name in decoder["past"]:
        heads, head_dim, dtype = decoder["past"][inp.name]
        feed[inp.name] = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
    elif inp.name == "input_ids":
        feed[inp.name] = np.full((batch, seq), token, dtype=np.int64)
    elif inp.name == "attention_mask":
        feed[inp.name] = np.ones((batch, seq), dtype=np.int64)
    elif inp.name == "position_ids" and decoder["past"]:
        feed[inp.name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
    else:
        feed[inp.name] = np.zeros((batch, seq), dtype=np.int64)
names = [o.name for o in session.get_outputs()]
outputs = session.run(names, feed)
for step in range(decoder["new_tokens"]):
    present = dict(zip(names, outputs))
    length = seq + step + 1
    feed = {"input_ids": np.full((batch, 1), token, dtype=np.int64),
            "attention_mask": np.ones((batch, length), dtype=np.int64)}
    if "position_ids" in [i.name for i in session.get_inputs()]:
        feed["position_ids"] = np.full((batch, 1), length - 1, dtype=np.int64)
    for name in decoder["past"]:
        feed[name] = present["present." + name[len("past_key_values."):]]
    outputs = session.run(names, feed)
out = {"host_peak_mb": rss_peak_mb(), "host_before_session_mb": before, "host_after_load_mb": loaded}
if device != "cpu":
    try:
        used, method = device_mb()
        if method == "process":
            out["device_used_mb"] = used
            out["device_method"] = "this process's device memory (NVML per-process accounting)"
        else:
            out["device_used_mb"] = used - device_before[0] if device_before else None
            out["device_method"] = ("device memory in use after the session minus before it (NVML lists no "
                                    "processes here); other work on the GPU in between would count")
    except Exception as exc:
        out["device_used_mb"] = None
        out["device_reason"] = "NVML unavailable: " + str(exc)
print(json.dumps(out))
"""


def disk_bytes(folder: Path) -> int:
    """``model.onnx`` plus any external-data files beside it."""
    files = [folder / ONNX_FILE, *folder.glob("*.onnx_data"), *folder.glob("*.onnx.data")]
    return sum(f.stat().st_size for f in files if f.is_file())


def parameter_count(folder: Path) -> int:
    """Elements of the graph's initializers, less the cos/sin tables of ONNX Runtime's fused ``RotaryEmbedding``.

    Those tables (SmolLM2: 2 x 131,072 positions x 32 = 8.4 M values) are computed from the rotary base, not
    learned; the unfused export computes them in the graph and has none.
    """
    model = onnx.load(str(folder / ONNX_FILE), load_external_data=False)
    tables = {name for node in model.graph.node if node.op_type == "RotaryEmbedding" and node.domain == "com.microsoft"
              for name in node.input[2:4]}
    return sum(math.prod(init.dims) for init in model.graph.initializer if init.name not in tables)


def session_memory(folder: Path, device: str = "cpu", batch: int = 8, seq: int = 128,
                   threads: int = 2, decoder: dict[str, Any] | None = None) -> dict[str, Any]:
    """Peak resident memory of a process that loads the model and runs one batch, and on CUDA the device memory
    of that process (NVML's per-process figure, or the device's use after minus before the session, as the
    result's ``device_method`` says).

    ``decoder`` (see :func:`decoder_probe`) makes the batch a prefill of ``seq`` tokens with an empty past followed by
    decode steps that grow the KV cache.
    """
    if device != "cpu":
        try:
            require_provider(device)
        except DeviceUnavailableError as exc:
            return {"available": False, "reason": str(exc)}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(folder / ONNX_FILE), device, str(batch), str(seq), str(threads),
         str(synthetic_token(folder)), *([json.dumps(decoder)] if decoder else [])],
        capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise ExportError(f"memory probe of {folder} failed: {lines[-1] if lines else f'exit code {proc.returncode}'}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # the peak over the process's life minus what it held before the session existed
    result["session_mb"] = result["host_peak_mb"] - result["host_before_session_mb"]
    result["available"] = True
    return result


def decoder_probe(graph: Any, new_tokens: int) -> dict[str, Any]:
    """The memory probe's description of a decoder graph (:class:`~.decoder.DecoderGraph`) and its decode steps."""
    dtype = np.dtype(graph.dtype).name
    return {"past": {name: [h, d, dtype] for name, h, d in zip(graph.past, graph.kv_heads, graph.head_dim,
                                                                strict=True)},
            "new_tokens": new_tokens}


def measure_memory(folder: str | Path, device: str = "cpu", batch: int = 8, seq: int = 128,
                   threads: int = 2, decoder: dict[str, Any] | None = None) -> dict[str, Any]:
    folder = Path(folder)
    out: dict[str, Any] = {
        "disk_bytes": disk_bytes(folder),
        "parameters": parameter_count(folder),
        "weight_bytes": weight_bytes(onnx.load(str(folder / ONNX_FILE), load_external_data=False)),
        "host": session_memory(folder, device, batch, seq, threads, decoder),
    }
    if device == "cpu":
        out["device"] = {"available": False, "reason": "CPU execution provider: no device memory"}
    else:
        host = out["host"]
        out["device"] = {"available": host.get("device_used_mb") is not None, "used_mb": host.get("device_used_mb"),
                         "method": host.get("device_method"), "reason": host.get("device_reason") or host.get("reason")}
    return out
