"""Export and optimisation of decoder LMs: fused operators, parity figures and times.

For the embedded SmolLM2-135M and a plain-SVD copy keeping ``--keep`` of its block-linear weights, and for a tiny
model of every supported family (dense and SVD keep 0.5), it exports with the KV cache and optimises for the CPU
(``export_onnx`` -> ``optimize_onnx``, O2), then records:

* the fused operators of every optimised graph, baseline against compressed, per kind;
* the parity figures of each step: ONNX Runtime vs PyTorch after export, optimised vs unoptimised graph, and
  int8 vs float32 for the compressed SmolLM2 (``--int8``);
* wall and CPU seconds of each export and optimisation, and of ONNX Runtime's optimiser run as it comes (every pass
  of its model type, ``Constant`` nodes in place) on the same dense SmolLM2 graph, with what each fused.

    python benchmarks/decoder_export.py --keep 0.8 --int8

Writes benchmarks/results/decoder_export.json and decoder_export.md. SmolLM2 takes minutes per graph on a
2-core machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import onnx
import torch

from fwsvd_deploy import CompressionConfig, compress, load_tokenizer, save_model
from fwsvd_deploy.config import ExportConfig, OptimizeConfig
from fwsvd_deploy.exporters import export_onnx, optimize_onnx
from fwsvd_deploy.exporters.optimize import fused_operator_counts
from fwsvd_deploy.families import FAMILIES
from fwsvd_deploy.modeling import EMBEDDED_DECODER, load_causal_lm, package_versions

HERE = Path(__file__).resolve().parent
TASK = "text-generation-with-past"
# Tiny configs: 2 layers, hidden 64, 4 query heads (2 key/value heads where the family has grouped-query attention).
_TINY_GQA = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 128}
TINY = {
    "llama": _TINY_GQA, "mistral": _TINY_GQA, "qwen2": _TINY_GQA,
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128},
    "opt": {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 128, "word_embed_proj_dim": 64},
}


class Clock:
    """Wall and process CPU seconds (all threads) of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def to_dict(self) -> dict[str, float]:
        return {"wall_s": round(self.wall, 1), "cpu_s": round(self.cpu, 1)}


def export_and_optimise(folder: Path, work: Path, name: str, int8: bool = False) -> dict[str, Any]:
    with Clock() as export_clock:
        exported = export_onnx(folder, ExportConfig(task=TASK), work / f"{name}-onnx", overwrite=True)
    with Clock() as optimise_clock:
        optimized = optimize_onnx(exported.out_dir, OptimizeConfig(), work / f"{name}-opt", overwrite=True)
    row = {"export": export_clock.to_dict() | {"parity": _parity(exported.parity)},
           "optimize": optimise_clock.to_dict() | {"parity": _parity(optimized.parity)},
           "fused_operators": fused_operator_counts(onnx.load(str(optimized.onnx_path))),
           "fusions": {k: v for k, v in optimized.fusions.items() if v},
           "reference_fusions": optimized.reference_fusions and {k: v for k, v in optimized.reference_fusions.items()
                                                                 if v},
           "low_rank_layers": optimized.low_rank_layers, "kv_cache_bytes_per_token": exported.kv_cache.bytes_per_token,
           "greedy_text": exported.parity["greedy"]["text"]}
    if int8:
        with Clock() as int8_clock:
            quantized = optimize_onnx(exported.out_dir, OptimizeConfig(quantize="int8"), work / f"{name}-int8",
                                      overwrite=True)
        row["int8"] = int8_clock.to_dict() | {"parity": _parity(quantized.parity),
                                              "fusions": {k: v for k, v in quantized.fusions.items() if v}}
    return row


def _parity(parity: dict[str, Any]) -> dict[str, Any]:
    return {"max_abs_diff": parity["max_abs_diff"], "greedy_identical": parity["greedy"]["identical"],
            "greedy_first_difference": parity["greedy"]["first_difference"], "shapes": parity["shapes"]}


def stock_optimiser(onnx_dir: Path, config: Any) -> dict[str, Any]:
    """ONNX Runtime's optimiser with every pass of the family's model type, on the graph as exported."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    ort_type = FAMILIES[config.model_type].ort_model_type
    model = onnx.load(str(onnx_dir / "model.onnx"))
    with Clock() as clock:
        optimized = optimize_model(model, model_type=ort_type, num_heads=config.num_attention_heads,
                                   hidden_size=config.hidden_size, optimization_options=FusionOptions(ort_type),
                                   opt_level=0)
    return clock.to_dict() | {"nodes": len(model.graph.node), "fused_operators": fused_operator_counts(optimized.model)}


def tiny_rows(work: Path, tokenizer: Any) -> dict[str, dict[str, Any]]:
    from transformers import AutoConfig, AutoModelForCausalLM

    rows = {}
    for family, settings in TINY.items():
        for variant in ("baseline", "svd-0.5"):
            torch.manual_seed(0)
            config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **settings)
            model = AutoModelForCausalLM.from_config(config).eval()
            if variant != "baseline":
                compress(model, CompressionConfig(method="svd", ratio=0.5))
            save_model(model, work / f"tiny-{family}-{variant}", tokenizer, overwrite=True)
            rows[f"tiny {family} {variant}"] = export_and_optimise(work / f"tiny-{family}-{variant}", work,
                                                                   f"tiny-{family}-{variant}")
    return rows


def smollm2_rows(work: Path, keep: float, int8: bool, stock: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    from fwsvd_deploy.modeling import resolve_model

    source = Path(resolve_model(EMBEDDED_DECODER))
    tokenizer = load_tokenizer(EMBEDDED_DECODER)
    rows = {"SmolLM2-135M baseline": export_and_optimise(source, work, "smollm2-baseline")}
    model = load_causal_lm(EMBEDDED_DECODER)
    compress(model, CompressionConfig(method="svd", ratio=keep))
    save_model(model, work / f"smollm2-svd-{keep}", tokenizer, overwrite=True)
    rows[f"SmolLM2-135M SVD keep {keep}"] = export_and_optimise(work / f"smollm2-svd-{keep}", work,
                                                                f"smollm2-svd-{keep}", int8=int8)
    return rows, stock_optimiser(work / "smollm2-baseline-onnx", model.config) if stock else None


def to_markdown(result: dict[str, Any]) -> str:
    kinds = sorted({k for r in result["graphs"].values() for k in r["fused_operators"]})
    lines = ["| graph | " + " | ".join(kinds) + " | low-rank layers | export s (CPU s) | optimise s (CPU s) |",
             "|---|" + "---:|" * (len(kinds) + 3)]
    for name, r in result["graphs"].items():
        counts = " | ".join(str(r["fused_operators"].get(k, 0)) for k in kinds)
        lines.append(f"| {name} | {counts} | {r['low_rank_layers']} | {r['export']['wall_s']} ({r['export']['cpu_s']})"
                     f" | {r['optimize']['wall_s']} ({r['optimize']['cpu_s']}) |")
    lines += ["", "| graph | export: max abs logit diff, greedy | optimise: max abs diff, greedy |", "|---|---|---|"]
    for name, r in result["graphs"].items():
        e, o = r["export"]["parity"], r["optimize"]["parity"]
        lines.append(f"| {name} | {e['max_abs_diff']:.2e}, {'identical' if e['greedy_identical'] else 'differs'} | "
                     f"{o['max_abs_diff']:.2e}, {'identical' if o['greedy_identical'] else 'differs'} |")
    for name, r in result["graphs"].items():
        if "int8" in r:
            rows = r["int8"]["parity"]["shapes"]
            lines += ["", f"int8 ({name}): logits signal-to-noise "
                      + ", ".join(f"{s['sqnr_db']:.1f} dB" for s in rows) + "; top-1 agreement "
                      + ", ".join(f"{s['agreement']:.3f}" for s in rows)
                      + f"; greedy first difference {r['int8']['parity']['greedy_first_difference']}; "
                      f"{r['int8']['wall_s']} s ({r['int8']['cpu_s']} CPU s)"]
    if result.get("stock_optimiser"):
        s = result["stock_optimiser"]
        lines += ["", f"ONNX Runtime's optimiser as it comes on the dense SmolLM2 graph ({s['nodes']} nodes): "
                  f"{s['wall_s']} s ({s['cpu_s']} CPU s), fused {s['fused_operators']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=float, default=0.8, help="kept fraction of SmolLM2's block-linear weights")
    parser.add_argument("--int8", action="store_true", help="also quantise the compressed SmolLM2 to int8")
    parser.add_argument("--no-smollm2", action="store_true", help="tiny models only")
    parser.add_argument("--no-stock", action="store_true", help="skip ONNX Runtime's optimiser as it comes")
    parser.add_argument("--work", default=None, help="folder for the graphs (default: a temporary one)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        tokenizer = load_tokenizer(EMBEDDED_DECODER)
        graphs: dict[str, Any] = {}
        stock = None
        if not args.no_smollm2:
            smol, stock = smollm2_rows(work, args.keep, args.int8, not args.no_stock)
            graphs |= smol
        graphs |= tiny_rows(work, tokenizer)
    result = {"graphs": graphs, "stock_optimiser": stock,
              "environment": {"python": sys.version.split()[0], "platform": platform.platform(),
                              "torch_threads": torch.get_num_threads(), "versions": package_versions()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decoder_export.json").write_text(json.dumps(result, indent=2))
    (out / "decoder_export.md").write_text(to_markdown(result))
    print(to_markdown(result), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
