"""Shared fixtures: tiny seeded models built from configs, the embedded tokenizer, toy data, tolerances."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download: a hub id fails at once, before transformers is imported

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AlbertConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    ElectraConfig,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from fwsvd_deploy.config import ExportConfig, OptimizeConfig  # noqa: E402
from fwsvd_deploy.data import TaskData  # noqa: E402
from fwsvd_deploy.exporters import ExportResult, OptimizeResult, export_onnx, optimize_onnx  # noqa: E402
from fwsvd_deploy.modeling import embedded_model_dir  # noqa: E402

torch.set_num_threads(2)

# One table of tolerances, by kind of comparison.
TOL = {
    "identity": 1e-5,  # math identities on float64-computed factors, compared in float32 (absolute)
    "identity_rel": 1e-4,  # ... and relative, for the larger entries
    "reload": 0.0,  # save -> load must give bit-identical logits
    "fisher_sum": 1e-4,  # the same sums accumulated in another order / process layout (relative)
    "moment": 1e-5,  # input statistics: float32 products per batch against a float64 reference (relative)
    "onnx_vs_torch": 1e-4,  # the same weights through ONNX Runtime and PyTorch (ExportConfig's default atol)
    "same_graph": 1e-5,  # one graph through two ONNX Runtime front ends (optimum's ORTModel, our session)
    "optimised_graph": 1e-3,  # fused vs unfused graph, float32 (OptimizeConfig's default atol)
    "int8_snr_db": 15.0,  # lossy: dynamic int8 weights against the float32 graph (tiny untrained models: ~20 dB)
    "int8-weight_snr_db": 30.0,  # lossy: 8-bit block weights, float activations (tiny untrained models: ~40 dB)
    "int4_snr_db": 10.0,  # lossy: 4-bit block weights against the float32 graph (tiny untrained models)
    "fp16_snr_db": 40.0,  # lossy: float16 weights (CUDA) against float32 on the CPU
    "perplexity_reduction": 1e-5,  # our token-weighted perplexity vs transformers' own loss, same logits (relative)
    "onnx_vs_torch_perplexity": 1e-5,  # ONNX Runtime vs PyTorch perplexity, same fp32 weights (relative)
    "kv_cache_logits": 1e-4,  # one graph's decode-with-cache logits vs its full forward at the same positions
}


def snr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-noise ratio of ``approx`` against ``reference`` in decibels (torchao's ``compute_error``)."""
    reference = np.asarray(reference, dtype=np.float64)
    noise = np.linalg.norm(reference - np.asarray(approx, dtype=np.float64))
    return float("inf") if noise == 0 else float(20 * np.log10(np.linalg.norm(reference) / noise))

VOCAB = 30522  # the embedded MiniLM tokenizer's vocabulary; all tiny models share it
TINY = {
    "bert": lambda labels: BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=labels)),
    "distilbert": lambda labels: DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128,
        num_labels=labels)),
    "roberta": lambda labels: RobertaForSequenceClassification(RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=130, pad_token_id=0, num_labels=labels)),
    "gpt2": lambda labels: GPT2ForSequenceClassification(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128, pad_token_id=0, num_labels=labels)),
}
ARCHS = tuple(TINY)


def tiny_model(arch: str, num_labels: int = 2, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return TINY[arch](num_labels).eval()


# Encoder configs for the export tests: every architecture the exporter supports, 2 layers, hidden 32, 2 heads.
ENCODER_CONFIGS = {
    "bert": lambda: BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=128),
    "distilbert": lambda: DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                           max_position_embeddings=128),
    "roberta": lambda: RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=130, pad_token_id=0),
    "albert": lambda: AlbertConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=128),
    "electra": lambda: ElectraConfig(vocab_size=VOCAB, embedding_size=16, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=128),
}
TASK_CLASSES = {
    "text-classification": AutoModelForSequenceClassification,
    "token-classification": AutoModelForTokenClassification,
    "question-answering": AutoModelForQuestionAnswering,
    "feature-extraction": AutoModel,
}


def tiny_encoder(arch: str, task: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = ENCODER_CONFIGS[arch]()
    config.num_labels = 3 if task == "token-classification" else 2
    return TASK_CLASSES[task].from_config(config).eval()


def export_and_optimise(folder: Path, task: str) -> tuple[Path, ExportResult, OptimizeResult]:
    """``folder`` exported for ``task`` and optimised for the CPU, beside it (``NAME-onnx``, ``NAME-opt``)."""
    exported = export_onnx(folder, ExportConfig(task=task), folder.parent / f"{folder.name}-onnx")
    return folder, exported, optimize_onnx(exported.out_dir, OptimizeConfig(), folder.parent / f"{folder.name}-opt")


def tiny_causal_lm(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                      pad_token_id=0)).eval()


# Decoder configs: 2 layers, hidden 32; the Llama-style ones use grouped-query attention (4 query, 2 key/value heads).
DECODER_CONFIGS = {
    "llama": lambda: LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     sliding_window=None),
    "qwen2": lambda: Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128),
    "opt": lambda: OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                             max_position_embeddings=128, word_embed_proj_dim=32),
}
DECODERS = tuple(DECODER_CONFIGS)


def tiny_decoder(arch: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(DECODER_CONFIGS[arch]()).eval()


# Decoder configs for the export tests (larger than DECODER_CONFIGS): every family the optimiser supports, 2 layers,
# hidden 64, 4 query heads; the grouped-query families have 2 key/value heads, so k and v are 64 -> 32 (narrower
# than q). They share the SmolLM2 tokenizer's vocabulary, so generation decodes to real text and padding and
# end-of-sequence are a decoder's.
LM_VOCAB = 49152
_GQA = {"vocab_size": LM_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
LM_DECODER_CONFIGS = {
    "llama": lambda: LlamaConfig(**_GQA, tie_word_embeddings=True),
    "mistral": lambda: MistralConfig(**_GQA),
    "qwen2": lambda: Qwen2Config(**_GQA),
    "gpt2": lambda: GPT2Config(vocab_size=LM_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128),
    "opt": lambda: OPTConfig(vocab_size=LM_VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64),
}
DECODER_FAMILIES = tuple(LM_DECODER_CONFIGS)


def lm_decoder(family: str, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A seeded tiny causal LM of ``family`` whose special tokens are the tokenizer's."""
    torch.manual_seed(seed)
    config = LM_DECODER_CONFIGS[family]()
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return AutoModelForCausalLM.from_config(config).eval()


def lm_model_folder(root: Path, tokenizer, family: str, variant: str) -> Path:
    """``root/FAMILY-VARIANT``: the tiny decoder of ``family`` saved as it is (``baseline``) or compressed by the
    method ``variant`` at ratio 0.5."""
    from fwsvd_deploy import CompressionConfig, compress, save_compressed, save_model

    model = lm_decoder(family, tokenizer)
    folder = root / f"{family}-{variant}"
    if variant == "baseline":
        save_model(model, folder, tokenizer)
    else:
        report = compress(model, CompressionConfig(method=variant, ratio=0.5))
        save_compressed(model, folder, tokenizer, report=report)
    return folder


def export_decoder(model: torch.nn.Module, tokenizer, out: Path, task: str = "text-generation-with-past") -> Path:
    """A decoder exported by optimum-onnx as it ships (fp32, KV cache), with the tokenizer beside the graph."""
    from optimum.exporters.onnx import onnx_export_from_model

    onnx_export_from_model(model, str(out), task=task, do_validation=False, device="cpu")
    tokenizer.save_pretrained(out)
    return out


_WORDS_POS = ("great", "wonderful", "moving", "brilliant", "funny", "superb")
_WORDS_NEG = ("dull", "awful", "boring", "clumsy", "tedious", "bland")


def toy_data(n: int = 48, seed: int = 0) -> TaskData:
    """A tiny two-class sentiment set of varied lengths (so batches carry padding)."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        words = _WORDS_POS if label else _WORDS_NEG
        k = int(torch.randint(1, 6, (1,), generator=g))
        picks = [words[int(j)] for j in torch.randint(0, len(words), (k,), generator=g)]
        texts.append(f"the film was {' and '.join(picks)} overall")
        labels.append(label)
    return TaskData(texts=tuple(texts), labels=tuple(labels), label_names=("negative", "positive"), source="toy")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model_dir()))


@pytest.fixture(scope="session")
def lm_tokenizer():
    """The real SmolLM2 tokenizer (from the embedded decoder, converted once and cached)."""
    from fwsvd_deploy.modeling import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture()
def data() -> TaskData:
    return toy_data()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny BERT classifier folder with tokenizer and label names, for CLI tests."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    model = tiny_model("bert")
    model.config.id2label = {0: "negative", 1: "positive"}
    model.config.label2id = {"negative": 0, "positive": 1}
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny Llama (grouped-query attention, tied embeddings) with the embedded tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_decoder("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def toy_text(tmp_path_factory) -> Path:
    """A local text file of blank-line-separated paragraphs (a few thousand tokens)."""
    path = tmp_path_factory.mktemp("text") / "notes.txt"
    words = [w for pair in zip(_WORDS_POS, _WORDS_NEG, strict=True) for w in pair]
    paragraphs = [" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) for i in range(40)]
    path.write_text("\n\n".join(paragraphs))
    return path


@pytest.fixture(scope="session")
def toy_csv(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    path = folder / "toy.csv"
    d = toy_data(80)
    import pandas as pd

    pd.DataFrame({"sentence": d.texts, "sentiment": [d.label_names[y] for y in d.labels]}).to_csv(path, index=False)
    return path


def logits(model: torch.nn.Module, tok, data: TaskData, max_length: int = 32) -> torch.Tensor:
    from fwsvd_deploy.losses import forward_inputs

    with torch.no_grad():
        return torch.cat([model(**forward_inputs(model, b)).logits for b in data.batches(tok, 16, max_length)])


def cuda_available() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run for real where ONNX Runtime has CUDA, and are skipped, saying why, elsewhere."""
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu and not cuda_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU: ONNX Runtime here offers no CUDAExecutionProvider "
                                       "(install fwsvd-deploy[gpu] on a machine with an NVIDIA GPU)")
        for item in gpu:
            item.add_marker(skip)
