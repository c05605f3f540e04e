"""``manifest.json``: what every output folder carries to tie it to its inputs, and how its contents are hashed."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_FINGERPRINTED = (".json", ".safetensors", ".onnx", ".onnx_data", ".txt", ".model")
VERSIONED_PACKAGES = ("fwsvd-deploy", "torch", "transformers", "safetensors", "onnx", "onnxruntime",
                      "onnxruntime-gpu", "optimum-onnx")


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    from importlib import metadata

    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: Path) -> str:
    """SHA-256 over the names and contents of the model, config and tokenizer files of a folder."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix in _FINGERPRINTED
                       and p.name != MANIFEST_FILE):
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over parameter names, shapes, dtypes and bytes, and the architecture's name."""
    import torch

    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def write_manifest(folder: Path, content: dict[str, Any]) -> Path:
    """Write ``manifest.json`` last: versions, ``content``, and ``content_sha256`` over the folder's files."""
    data = {
        "manifest_version": MANIFEST_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": package_versions(),
        **content,
        "content_sha256": folder_fingerprint(folder),
    }
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def read_json_object(path: Path, error: type[Exception], hint: str = "") -> dict[str, Any]:
    """The JSON object in a file; a missing, unreadable or non-object file raises ``error`` naming it.

    Args:
        path: the file.
        error: the exception type to raise (the caller's kind of input error).
        hint: what the file should be, appended to the message.
    """
    from .errors import first_line

    suffix = f"; {hint}" if hint else ""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"cannot read {path}: {first_line(exc)}{suffix}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} is not a JSON object{suffix}")
    return data


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The folder's manifest, or ``None`` when it has none or it is not readable JSON."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def verify_manifest(folder: Path) -> str | None:
    """Why the folder does not match its manifest (missing, unreadable, contents changed), or ``None`` when it does."""
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{Path(folder) / MANIFEST_FILE} is missing or unreadable"
    expected = manifest.get("content_sha256")
    if not isinstance(expected, str):
        return f"{Path(folder) / MANIFEST_FILE} records no content hash"
    if folder_fingerprint(folder) != expected:
        return f"the files of {folder} differ from the hash in its manifest"
    return None
