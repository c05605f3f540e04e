"""ONNX Runtime sessions on a chosen device, and output comparison between two models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DeviceUnavailableError, ExportError, ParityError, first_line
from ..manifest import read_json_object

ONNX_FILE = "model.onnx"
PARITY_TEXTS = (
    "A three-hour cinema master class.",
    "It is neither funny nor clever, and it goes on far too long for what little it has to say.",
    "Dull.",
    "The cast is uniformly excellent, the script sharp, the photography gorgeous, and the ending earns its tears.",
    "An odd, likeable mess.",
)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
GPU_DEVICES = ("cuda", "tensorrt")


def onnx_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` beside an exported graph.

    Raises:
        ConfigError: when it is missing or not a JSON object.
    """
    hint = "give a folder written by 'fwsvd-deploy export/optimize'"
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{folder} has no config.json; {hint}")
    return read_json_object(path, ConfigError, hint)


def require_provider(device: str) -> str:
    """The execution provider for ``device``; a clear error when it is absent."""
    import onnxruntime as ort

    provider = PROVIDERS[device]
    available = ort.get_available_providers()
    if provider not in available:
        if device == "tensorrt":
            raise DeviceUnavailableError(
                "TensorRT is not available: ONNX Runtime here offers only "
                f"{', '.join(available)}; it needs onnxruntime-gpu built with TensorRT and the TensorRT libraries "
                "on an NVIDIA machine, or use --device cuda / cpu"
            )
        if device == "cuda":
            raise DeviceUnavailableError(
                "CUDA is not available: ONNX Runtime here offers only "
                f"{', '.join(available)}; install fwsvd-deploy[gpu] (onnxruntime-gpu) on a machine with an NVIDIA "
                "GPU and driver, or use --device cpu"
            )
        raise DeviceUnavailableError(f"{provider} is not available; ONNX Runtime offers {', '.join(available)}")
    return provider


def make_session(path: str | Path, device: str = "cpu", threads: int | None = None, spinning: bool = True,
                 cuda_graph: bool = False, spin_after_run: bool = True) -> Any:
    """An InferenceSession on ``device`` with all graph optimisations and fixed thread counts.

    ``spinning=False`` makes idle intra-op threads sleep instead of busy-waiting for the next operator; sessions
    timed one after another in one process need it, or the previous session's spinning threads take cores
    from the one being timed. ``spin_after_run=False`` is the other way to that end: the threads busy-wait between
    the operators of a run, as in a deployed session, and stop when the run returns. A decode step is hundreds of
    operators of tens of microseconds; a sleeping thread takes about 25 us to wake for each (measured on 2 cores),
    a cost no deployed session pays. ``cuda_graph=True`` (CUDA only) captures the graph on the first I/O-bound run and
    replays it after; inputs and outputs must then stay at the same device addresses and shapes.
    """
    import onnxruntime as ort

    provider = require_provider(device)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif not spin_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3
    if cuda_graph and device != "cuda":
        raise ConfigError(f"CUDA graphs need device 'cuda', not {device!r}")
    try:
        # TensorRT takes what it can and leaves the rest of the graph to CUDA
        providers: list[Any] = [provider, PROVIDERS["cuda"]] if device == "tensorrt" else [provider]
        if cuda_graph:
            providers = [(provider, {"enable_cuda_graph": "1"})]
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from exc
    check_session_provider(session.get_providers(), device)
    return session


def check_session_provider(used: list[str], device: str) -> None:
    """Refuse a session that ONNX Runtime quietly moved off ``device``'s provider.

    ONNX Runtime lists TensorRT and CUDA whenever its GPU build is installed, and when one of them cannot start
    (libnvinfer or cuDNN missing, no GPU) it retries on the providers after it: a session meant for TensorRT then
    runs on CUDA, one meant for CUDA on the CPU, and its figures would be reported under the wrong device.

    Raises:
        DeviceUnavailableError: the session's first provider is not ``device``'s.
    """
    wanted = PROVIDERS[device]
    if used and used[0] == wanted:
        return
    needs = {"tensorrt": "the TensorRT libraries (libnvinfer, e.g. pip install tensorrt-cu12 or tensorrt-cu13 to "
                         "match onnxruntime-gpu's CUDA) on the library path",
             "cuda": "the CUDA and cuDNN libraries that onnxruntime-gpu was built for, and an NVIDIA GPU and driver"}
    raise DeviceUnavailableError(
        f"{wanted} is installed but could not start (ONNX Runtime fell back to {', '.join(used) or 'nothing'}); "
        f"it needs {needs.get(device, 'its libraries')}, or use --device "
        f"{'cuda / cpu' if device == 'tensorrt' else 'cpu'}"
    )


def session_input_names(session: Any) -> list[str]:
    return [i.name for i in session.get_inputs()]


def session_output_names(session: Any) -> list[str]:
    return [o.name for o in session.get_outputs()]


def run_session(session: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = session_output_names(session)
    feed = {k: v for k, v in inputs.items() if k in set(session_input_names(session))}
    return dict(zip(names, session.run(names, feed), strict=True))


def parity_inputs(tokenizer: Any, input_names: list[str], batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """Real text padded to ``seq_len``; rows of different lengths so padding is exercised."""
    texts = [PARITY_TEXTS[i % len(PARITY_TEXTS)] for i in range(batch)]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    out = {}
    for name in input_names:
        if name in enc:
            out[name] = enc[name].astype(np.int64)
        elif name == "token_type_ids":
            out[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
        else:
            raise ExportError(f"the ONNX model wants an input {name!r} that the tokenizer does not produce")
    return out


def compare_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, float]:
    """Max absolute difference per output; token-level outputs are compared on real (unpadded) tokens only.

    Raises:
        ParityError: when the two sides do not give the same outputs (or none at all), or shapes differ.
    """
    if set(got) != set(want) or not want:
        raise ParityError(f"the models give different outputs: {sorted(got) or 'none'} against the reference's "
                          f"{sorted(want) or 'none'}; parity needs the same, non-empty set of outputs")
    diffs = {}
    for name, ref in want.items():
        out = got[name].astype(np.float64)
        ref = ref.astype(np.float64)
        if out.shape != ref.shape:
            raise ParityError(f"output {name!r} has shape {out.shape}, the reference {ref.shape}")
        diff = np.abs(out - ref)
        if diff.ndim >= 2 and diff.shape[:2] == mask.shape:
            diff = diff[mask.astype(bool)]
        diffs[name] = float(diff.max()) if diff.size else 0.0
    return diffs


def parity_report(
    session: Any,
    tokenizer: Any,
    reference: Callable[[dict[str, np.ndarray], list[str]], dict[str, np.ndarray]],
    shapes: Sequence[tuple[int, int]],
    atol: float,
    *,
    what: str,
) -> dict[str, Any]:
    """Compare ``session`` with ``reference`` on each (batch, sequence) shape; raise when beyond ``atol``.

    Raises:
        ParityError: naming the output, the shape and the difference; or when the two sides share no output.
    """
    rows = []
    worst = 0.0
    failures = []
    names = session_output_names(session)
    for batch, seq in shapes:
        inputs = parity_inputs(tokenizer, session_input_names(session), batch, seq)
        got = run_session(session, inputs)
        want = reference(inputs, names)
        diffs = compare_outputs(got, want, inputs["attention_mask"])
        for name in want:
            if not diffs[name] <= atol:
                failures.append(f"{name} at batch {batch} x sequence {seq}: max |diff| {diffs[name]:.3g} > {atol:.3g}")
            worst = max(worst, diffs[name])
        rows.append({"batch": batch, "sequence": seq, "max_abs_diff": diffs})
    report = {"compared": what, "atol": atol, "max_abs_diff": worst, "shapes": rows,
              "passed": not failures}
    if failures:
        more = f" (+{len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ParityError(f"{what} parity failed: {failures[0]}{more}")
    return report
