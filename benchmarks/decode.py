"""Generation speed of optimised decoder graphs with the KV cache, against their optimised dense baseline.

Takes optimised ONNX folders (``optimize_onnx`` / the ``optimize-*`` stages of ``fwsvd-deploy run``), the first
being the baseline, and times them in one process, interleaved call by call (``measure_generation``: a prefill of
--prompt-len tokens, then --new-tokens decode steps on the returned cache, at each of --batches). With --unfused
each graph is also optimised again from its exported folder with ``fuse_attention=False`` and timed beside the
others, so the effect of the attention fusion is measured in the same run.

Per graph it reports decode ms per token and prefill ms, their ratios to the baseline (median of rounds, 10th-90th
percentile of the per-round ratio), the bytes of weights a decode step reads (every MatMul/Gemm weight: one token
reads each once; lm_head included, embeddings read one row) and their ratio, which bounds what a memory-bound
decode can gain, the nodes in the graph and its fused operators.

    fwsvd-deploy run --config examples/smollm2.yaml --out runs/smollm2     # keep 0.8
    fwsvd-deploy run --config KEEP06.yaml --out runs/smollm2               # the same with ratio: 0.6
    python benchmarks/decode.py --unfused \\
        --graph baseline=runs/smollm2/stages/optimize-baseline-* \\
        --graph keep-0.8=runs/smollm2/stages/optimize-candidate-<keep 0.8 key> \\
        --graph keep-0.6=runs/smollm2/stages/optimize-candidate-<keep 0.6 key>

Writes benchmarks/results/decode.json and decode.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import onnx

from fwsvd_deploy.config import OptimizeConfig
from fwsvd_deploy.exporters import optimize_onnx
from fwsvd_deploy.exporters.optimize import fused_operator_counts
from fwsvd_deploy.exporters.quantize import weight_bytes as quantized_weight_bytes
from fwsvd_deploy.manifest import read_manifest
from fwsvd_deploy.validators.generation import measure_generation

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import graph_folders  # noqa: E402


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the constant weights matrix products read, quantised ones (int8, int4 and their scales) included."""
    return sum(quantized_weight_bytes(model).values())


def describe(folder: Path) -> dict:
    model = onnx.load(str(folder / "model.onnx"))
    manifest = read_manifest(folder) or {}
    ops = Counter(n.op_type for n in model.graph.node)
    return {"folder": str(folder), "nodes": len(model.graph.node), "matmuls": ops["MatMul"] + ops["Gemm"],
            "weight_bytes": weight_bytes(model), "fused_operators": fused_operator_counts(model),
            "low_rank_layers": manifest.get("low_rank_layers"), "attention_fusion": manifest.get("attention_fusion")}


def unfused(folder: Path, work: Path) -> Path:
    """``folder`` optimised again from its exported graph, the attention left as exported."""
    manifest = read_manifest(folder) or {}
    source = manifest.get("input", {}).get("path")
    if not source or not Path(source, "model.onnx").is_file():
        raise SystemExit(f"{folder}: its manifest names no exported folder to optimise again ({source!r})")
    out = work / f"{folder.name}-unfused"
    if not (out / "model.onnx").is_file():
        optimize_onnx(source, OptimizeConfig(fuse_attention=False), out, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="append", required=True, metavar="NAME=FOLDER",
                    help="an optimised decoder folder; the first is the baseline")
    ap.add_argument("--unfused", action="store_true", help="also time every graph with its attention unfused")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="where the unfused graphs go (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    graphs = graph_folders(ap, args.graph)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        if args.unfused:
            graphs |= {f"{name} (attention unfused)": unfused(folder, work) for name, folder in list(graphs.items())}
        info = {name: describe(folder) for name, folder in graphs.items()}
        timing = measure_generation(graphs, batch_sizes=tuple(int(b) for b in args.batches.split(",")),
                                    prompt_len=args.prompt_len, new_tokens=args.new_tokens, threads=args.threads,
                                    warmup=args.warmup, rounds=args.rounds, progress=True)
    base = next(iter(graphs))
    for name in info:
        info[name]["weight_bytes_ratio"] = info[name]["weight_bytes"] / info[base]["weight_bytes"]
    result = {"command": " ".join(["python", "benchmarks/decode.py", *(argv or sys.argv[1:])]), "graphs": info,
              "generation": timing}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode.json").write_text(json.dumps(result, indent=2))
    (args.out / "decode.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    g = r["generation"]
    names = list(r["graphs"])
    lines = [f"# Decode speed with the KV cache ({g['device']}, {g['threads']} threads)", "",
             f"`{r['command']}`", "",
             f"Prefill {g['prompt_tokens']} tokens, then {g['new_tokens']} decode steps; {g['rounds']} rounds, "
             f"interleaved call by call, after {g['warmup']} warm-up. Ratios: median over rounds against `{names[0]}` "
             "(10th-90th percentile of the per-round ratio).", "",
             "| graph | nodes | MatMuls | fused operators | weights read per token | ratio |",
             "|---|---:|---:|---|---:|---:|"]
    for name, d in r["graphs"].items():
        fused = ", ".join(f"{k} {v}" for k, v in d["fused_operators"].items()) or "none"
        lines.append(f"| {name} | {d['nodes']:,} | {d['matmuls']} | {fused} | {d['weight_bytes'] / 1e6:.1f} MB | "
                     f"{d['weight_bytes_ratio']:.3f} |")
    lines += ["", "| batch | graph | decode ms/token (mean) | decode ratio | prefill ms (p50) | prefill ratio |",
              "|---:|---|---:|---|---:|---|"]
    for cell in g["cells"]:
        for name in names:
            m = cell["models"][name]
            ratio = cell["ratios"].get(name)
            dec = (f"**{ratio['decode']['p50']:.3f}** ({ratio['decode']['p10']:.3f}-{ratio['decode']['p90']:.3f})"
                   if ratio else "")
            pre = (f"{ratio['prefill']['p50']:.3f} ({ratio['prefill']['p10']:.3f}-{ratio['prefill']['p90']:.3f})"
                   if ratio else "")
            lines.append(f"| {cell['batch']} | {name} | {m['decode']['mean_ms']:.2f} | {dec} | "
                         f"{m['prefill']['p50_ms']:.1f} | {pre} |")
    env = g.get("environment", {})
    lines += ["", f"Environment: {json.dumps(env)}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
