"""Writing and reading model folders, dense or compressed, never leaving a half-written one.

A compressed folder is a normal transformers folder (``config.json``, ``model.safetensors``, tokenizer
files) plus ``compression.json``: the per-layer plan (kind, shape, rank), the method and its settings,
the report, package versions and the hash of the model it came from. ``load_compressed`` rebuilds the
architecture from the config with no network, applies the plan and loads the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .compression.apply import apply_plan, compressed_layers
from .compression.report import CompressionReport
from .errors import FwsvdError, ModelLoadError, OutputExistsError
from .modeling import PLAN_FILE, package_versions, read_plan

PLAN_FORMAT = "fwsvd-deploy/compressed-model"
PLAN_VERSION = 2  # 2: layers may name a ``shared_down`` (joint q/k/v); plans without one are still written as 1


def check_output_dir(path: str | Path, overwrite: bool = False) -> Path:
    """Fail early when ``path`` exists and holds anything, unless ``overwrite``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder {out} exists and is not empty; pass --overwrite or choose another")
    return out


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only when the block completes.

    An exception (or Ctrl-C) inside the block removes the temporary folder and leaves ``path`` as it was.
    """
    out = check_output_dir(path, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def shared_down_aliases(model: nn.Module) -> set[str]:
    """State-dict keys of down-projections that are another layer's (joint q/k/v): stored once, under the owner."""
    return {f"{name}.down.weight" for name, spec in compressed_layers(model).items() if "shared_down" in spec}


def _write_model(model: nn.Module, folder: Path, tokenizer: Any) -> None:
    aliases = shared_down_aliases(model)
    if aliases:  # safetensors stores a tensor once; the loader re-creates the sharing from the plan
        state = {k: v for k, v in model.state_dict().items() if k not in aliases}
        model.save_pretrained(folder, safe_serialization=True, state_dict=state)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_model(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    report: CompressionReport | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a dense model with ``save_pretrained``, or a compressed one with :func:`save_compressed`."""
    if compressed_layers(model):
        return save_compressed(model, out_dir, tokenizer, report=report, metadata=metadata, overwrite=overwrite)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        _write_model(model, tmp, tokenizer)
        if metadata:
            (tmp / "fwsvd_deploy.json").write_text(json.dumps(metadata, indent=2, default=str))
    return Path(out_dir)


def save_compressed(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    report: CompressionReport | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a compressed model folder that :func:`load_compressed` (and nothing else) rebuilds.

    Args:
        model: a model with factorised layers.
        out_dir: destination; must not exist or be empty unless ``overwrite``.
        tokenizer: saved beside the weights when given.
        report: the :class:`CompressionReport` of the compression, recorded in the plan.
        metadata: more keys for ``compression.json`` (e.g. the input model hash, configs).
        overwrite: replace an existing non-empty folder.

    Returns:
        ``out_dir``.
    """
    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_compressed(model, tmp, tokenizer, report=report, metadata=metadata)
    return Path(out_dir)


def write_compressed(
    model: nn.Module,
    folder: Path,
    tokenizer: Any = None,
    *,
    report: CompressionReport | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write the files of a compressed model into ``folder`` (which the caller makes atomic)."""
    layers = compressed_layers(model)
    if not layers:
        raise FwsvdError("the model has no factorised layers; use save_model for a dense model")
    plan: dict[str, Any] = {
        "format": PLAN_FORMAT,
        # a reader that predates shared down-projections refuses the plan instead of failing on missing weights
        "format_version": PLAN_VERSION if any("shared_down" in spec for spec in layers.values()) else 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "architecture": type(model).__name__,
        "layers": layers,
        "versions": package_versions(),
    }
    if report is not None:
        plan["method"] = report.method
        plan["fisher_axis"] = report.fisher_axis
        plan["report"] = report.to_dict()
    plan.update(metadata or {})
    _write_model(model, folder, tokenizer)
    (folder / PLAN_FILE).write_text(json.dumps(plan, indent=2, default=str))


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise ModelLoadError(f"{folder} has no model.safetensors; only safetensors weights are loaded")


def load_compressed(folder: str | Path) -> nn.Module:
    """Rebuild a model saved by :func:`save_compressed`, offline.

    Raises:
        ModelLoadError: when the folder is not a compressed model or its files do not agree.
    """
    import transformers

    path = Path(folder)
    if not (path / PLAN_FILE).is_file():
        raise ModelLoadError(f"{path} has no {PLAN_FILE}; it is not a compressed model folder")
    plan = read_plan(path)
    if plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("format_version"), int):
        raise ModelLoadError(f"{path / PLAN_FILE} is not a fwsvd-deploy plan")
    if plan["format_version"] > PLAN_VERSION:
        raise ModelLoadError(
            f"{path / PLAN_FILE} has format version {plan['format_version']}; this fwsvd-deploy reads up to "
            f"{PLAN_VERSION}: upgrade fwsvd-deploy"
        )
    config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    arch = plan.get("architecture") or (config.architectures or [None])[0]
    cls = getattr(transformers, str(arch), None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelLoadError(f"{path}: architecture {arch!r} is not a transformers model class")
    model = cls(config)
    try:
        apply_plan(model, plan["layers"])
    except ValueError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    state = _load_weights(path)
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or []) | shared_down_aliases(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ModelLoadError(
            f"{path}: weights do not match the plan (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]})"
        )
    model.tie_weights()
    model.eval()
    return model
