"""Writing and reading model folders, dense or compressed, never leaving a half-written one.

A compressed folder is a normal transformers folder (``config.json``, ``model.safetensors``, tokenizer
files) plus ``compression.json``: the per-layer plan (kind, shape, rank), the method and its settings,
the report, package versions and the hash of the model it came from. ``load_compressed`` rebuilds the
architecture from the config with no network, applies the plan and loads the weights.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from .compression.apply import apply_plan, compressed_layers
from .compression.report import CompressionReport
from .errors import ConfigError, ModelLoadError, first_line
from .manifest import package_versions
from .outputs import atomic_output_dir
from .outputs import check_output_dir as check_output_dir  # re-exported: callers have imported it from here
from .plan import PLAN_FILE, PLAN_FORMAT, PLAN_VERSION, read_plan


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


def write_model(
    model: nn.Module,
    folder: Path,
    tokenizer: Any = None,
    *,
    report: CompressionReport | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write a dense or compressed model into ``folder`` (which the caller makes atomic)."""
    if compressed_layers(model):
        write_compressed(model, folder, tokenizer, report=report, metadata=metadata)
        return
    _write_model(model, folder, tokenizer)
    if metadata:
        (folder / "fwsvd_deploy.json").write_text(json.dumps(metadata, indent=2, default=str))


def save_model(
    model: nn.Module,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    report: CompressionReport | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a dense model with ``save_pretrained``, or a compressed one as :func:`save_compressed` does."""
    with atomic_output_dir(out_dir, overwrite) as tmp:
        write_model(model, tmp, tokenizer, report=report, metadata=metadata)
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
        raise ConfigError("the model has no factorised layers (every targeted layer was left dense, so nothing was "
                          "compressed); choose a smaller rank or ratio, or save a dense model with save_model")
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


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for a truncated or foreign file
        raise ModelLoadError(f"cannot read {path} ({first_line(exc)}); the file is truncated or not "
                             "safetensors: write the folder again") from exc


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    single = folder / "model.safetensors"
    if single.is_file():
        return _read_safetensors(single)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"cannot read {index}: {first_line(exc)}") from exc
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(_read_safetensors(folder / shard))
        return state
    raise ModelLoadError(f"{folder} has no model.safetensors; only safetensors weights are loaded")


def _no_init_weights() -> contextlib.AbstractContextManager:
    """transformers' context that skips drawing a new model's weights (a no-op where a release lacks it)."""
    from transformers import modeling_utils

    skip = getattr(modeling_utils, "no_init_weights", None)
    return contextlib.nullcontext() if skip is None else skip()


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
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the config of {path}: {first_line(exc)}") from exc
    arch = plan.get("architecture") or (config.architectures or [None])[0]
    cls = getattr(transformers, str(arch), None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelLoadError(f"{path}: architecture {arch!r} is not a transformers model class")
    with _no_init_weights():  # every weight is loaded below: drawing random ones first is time and memory spent
        model = cls(config)
    try:
        apply_plan(model, plan["layers"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{path}: the plan in {PLAN_FILE} does not fit {arch}: {first_line(exc)}") from exc
    # float32 as the model was built, whatever the folder was saved in (assign keeps a tensor's own dtype)
    state = {k: v.float() if v.is_floating_point() else v for k, v in _load_weights(path).items()}
    try:
        result = model.load_state_dict(state, strict=False, assign=True)  # the read tensors, not copies of them
    except RuntimeError as exc:  # a tensor whose shape differs from the plan's
        raise ModelLoadError(f"{path}: weights do not match the plan in {PLAN_FILE} "
                             f"({first_line(exc).rstrip(':')}: {_size_mismatch(exc)})") from exc
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


def _size_mismatch(exc: RuntimeError) -> str:
    """The first "size mismatch for NAME" line of a ``load_state_dict`` error."""
    lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
    return lines[0] if lines else "shapes differ"
