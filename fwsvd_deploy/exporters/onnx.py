"""PyTorch -> ONNX through optimum-onnx's exporter, with a parity check on shapes other than the export's."""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ExportConfig
from ..errors import ConfigError, ExportError, ModelLoadError, first_line
from ..manifest import file_sha256, folder_fingerprint, write_manifest
from ..modeling import load_config, load_tokenizer, pretrained_kwargs, resolve_model
from ..outputs import atomic_output_dir, check_output_dir
from ..plan import PLAN_FILE, is_compressed, read_plan
from .decoder import DECODER_TASKS, CacheLayout, check_not_causal_lm, export_parity, load_for_export
from .runtime import ONNX_FILE, make_session, parity_report

TASK_HEADS = {
    "text-classification": ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    "token-classification": ("ForTokenClassification", "AutoModelForTokenClassification"),
    "question-answering": ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    "feature-extraction": ("Model", "AutoModel"),
}
SUPPORTED_MODEL_TYPES = ("bert", "distilbert", "roberta", "albert", "electra")


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    onnx_path: Path
    task: str
    opset: int
    compressed: bool
    parity: dict[str, Any]
    seconds: float
    kv_cache: CacheLayout | None = None  # decoders exported with their cache


def is_onnx_folder(folder: Path) -> bool:
    return (folder / ONNX_FILE).is_file() or any(folder.glob("*.onnx"))


def _load_for_task(model_dir: str, source: str, task: str, allow_pickle: bool) -> tuple[torch.nn.Module, bool]:
    import transformers

    suffix, auto_name = TASK_HEADS[task]
    if is_compressed(source):
        from ..checkpoint import load_compressed

        model = load_compressed(source)
        _check_model_type(model.config)
        if task != "feature-extraction" and not type(model).__name__.endswith(suffix):
            raise ConfigError(f"{source} is a {type(model).__name__}; it cannot be exported for task {task!r}")
        if task == "feature-extraction" and hasattr(model, "base_model") and model.base_model is not model:
            model = model.base_model
        return model, True
    config = load_config(model_dir)
    _check_model_type(config)
    archs = config.architectures or []
    if task != "feature-extraction" and not any(a.endswith(suffix) for a in archs):
        raise ConfigError(
            f"{source} is {', '.join(archs) or 'a model without a task head'}; task {task!r} needs a *{suffix} "
            "model (fine-tune one first, or use task feature-extraction)"
        )
    kwargs = pretrained_kwargs(source, allow_pickle)
    auto = getattr(transformers, auto_name)
    try:
        model = auto.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {source} for {task}: {first_line(exc)}") from exc
    return model.eval(), False


def _check_model_type(config: Any) -> str:
    model_type = getattr(config, "model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model type {model_type!r} is not supported for export; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def torch_outputs(model: torch.nn.Module, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    return {name: out[name].float().numpy() for name in names if name in out}


def export_onnx(model_dir: str | Path, cfg: ExportConfig, out_dir: str | Path, *,
                overwrite: bool = False, allow_pickle: bool = False) -> ExportResult:
    """Export a model folder (dense, or written by ``save_compressed``) to ``out_dir/model.onnx``.

    The folder also receives the config and tokenizer (so ``ORTModelFor*`` and a transformers ``pipeline``
    load it), and ``manifest.json`` with the input hash, settings, versions and parity figures.

    Raises:
        ConfigError: unknown task, unsupported model type, an opset too old, or an ONNX folder as input.
        ModelLoadError: an unreadable config or weights, pickled weights without ``allow_pickle``, a model that
            needs its own code, a hub id the hub (or, offline, the cache) cannot provide, no tokenizer files.
        ParityError: ONNX and PyTorch disagree beyond ``cfg.atol`` on the validation shapes, or share no output.
    """
    from optimum.exporters.onnx import onnx_export_from_model

    source = resolve_model(str(model_dir))
    if Path(source).is_dir() and is_onnx_folder(Path(source)):
        raise ConfigError(f"{model_dir} already holds an ONNX model; export takes a PyTorch model folder")
    check_output_dir(out_dir, overwrite, inputs=[source])
    if not is_compressed(source):
        load_config(str(model_dir))  # a hub id the hub cannot provide, a broken or custom-code config: say so first
    tokenizer = load_tokenizer(str(model_dir))
    decoder = cfg.task in DECODER_TASKS
    if decoder:
        model, compressed = load_for_export(source, cfg, tokenizer, str(model_dir), allow_pickle=allow_pickle)
    else:
        check_not_causal_lm(load_config(source), cfg.task, str(model_dir))
        model, compressed = _load_for_task(str(model_dir), source, cfg.task, allow_pickle)
    start = time.perf_counter()
    with atomic_output_dir(out_dir, overwrite, inputs=[source]) as tmp:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            previous = logging.getLogger("optimum").level
            logging.getLogger("optimum").setLevel(logging.ERROR)
            try:
                onnx_export_from_model(model, tmp, task=cfg.task, opset=cfg.opset, do_validation=False,
                                       preprocessors=[tokenizer], device="cpu")
            except Exception as exc:
                raise ExportError(f"export failed: {first_line(exc)}") from exc
            finally:
                logging.getLogger("optimum").setLevel(previous)
        onnx_path = tmp / ONNX_FILE
        import onnx

        proto = onnx.load(str(onnx_path), load_external_data=cfg.external_data)
        if cfg.external_data:
            for extra in tmp.glob("*.onnx_data"):
                extra.unlink()
            onnx.save_model(proto, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{ONNX_FILE}_data", size_threshold=1024)
        opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        del proto  # the parity sessions below hold the weights once more; the graph need not be a third copy
        onnx.checker.check_model(str(onnx_path))
        if compressed:
            shutil.copy(Path(source) / PLAN_FILE, tmp / "source_compression.json")
        session = make_session(onnx_path, "cpu", spinning=False)  # PyTorch runs between its calls
        kv_cache = None
        if decoder:
            parity, kv_cache = export_parity(session, model, tokenizer, cfg)
        else:
            parity = parity_report(session, tokenizer, lambda inputs, names: torch_outputs(model, inputs, names),
                                   cfg.validate_shapes, cfg.atol, what="ONNX vs PyTorch")
        seconds = time.perf_counter() - start
        write_manifest(tmp, {
            "kind": "onnx-export",
            "input": {"path": str(model_dir), "fingerprint": folder_fingerprint(Path(source)),
                      "compressed": compressed,
                      "compression": read_plan(source).get("report", {}).get("totals") if compressed else None},
            "settings": cfg.to_dict() | {"opset": opset},
            "artifacts": {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.suffix in (".onnx", ".onnx_data")},
            "parity": parity,
            "kv_cache": None if kv_cache is None else kv_cache.to_dict(),
            "seconds": seconds,
        })
    out = Path(out_dir)
    return ExportResult(out, out / ONNX_FILE, cfg.task, opset, compressed, parity, seconds, kv_cache)
