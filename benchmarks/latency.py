"""Latency of optimised compressed graphs against the optimised baseline, on the real MiniLM.

Builds (or reuses) the graphs under --work: the baseline and SVD-factorised models keeping 0.25 / 0.5 / 0.75 of
the encoder's block-linear weights (latency depends on the ranks, not on how the factors were chosen), with
q/k/v factorised one by one (`keep-K`, run as MultiHeadAttention), jointly (`keep-K-joint`, run as the fused
Attention operator), and jointly with every rank a multiple of 16 at the same budget (`keep-K-joint-x16`,
`rank_multiple=16`), each exported and optimised through the same path (`export_onnx` -> `optimize_onnx`).
Then, in one process, with a fixed thread count, it times every graph interleaved: warm-up, then rounds in
which each graph runs once, the order alternating (see `measure_latency`).
It reports median / p90 / p99, the ratio to the baseline's median, the weight-matmul FLOP ratio, and ONNX
Runtime's per-operator profile of each graph at the main shape.

    python benchmarks/latency.py --threads 2 --batch 32 --seq 128 --grid-batches 1,8,32 --grid-seqs 32,128

Writes benchmarks/results/latency.json and latency.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import onnx

from fwsvd_deploy import CompressionConfig, compress, load_classifier, load_tokenizer, save_model
from fwsvd_deploy.config import ExportConfig, OptimizeConfig
from fwsvd_deploy.exporters import export_onnx, optimize_onnx
from fwsvd_deploy.modeling import EMBEDDED_MODEL
from fwsvd_deploy.validators.latency import measure_latency, synthetic_inputs, vocab_size

HERE = Path(__file__).resolve().parent
KEEPS = (0.25, 0.5, 0.75)
# name suffix, q/k/v mode, rank multiple
VARIANTS = (("", "separate", 1), ("-joint", "joint", 1), ("-joint-x16", "joint", 16))


def build(work: Path, model_spec: str, keeps: tuple[float, ...]) -> dict[str, Path]:
    """Export and optimise the baseline and one compressed model per kept fraction and variant; reuse what exists."""
    graphs = {}
    base = load_classifier(model_spec, label_names=("rotten", "fresh"))
    tokenizer = load_tokenizer(model_spec)
    variants = [("baseline", None, "separate", 1)]
    variants += [(f"keep-{k}{suffix}", k, qkv, multiple) for k in keeps for suffix, qkv, multiple in VARIANTS]
    for name, keep, qkv, multiple in variants:
        optimized = work / f"{name}-optimized"
        if not (optimized / "model.onnx").is_file():
            model = copy.deepcopy(base)
            if keep is not None:
                compress(model, CompressionConfig(method="svd", ratio=keep, qkv=qkv, rank_multiple=multiple))
            torch_dir = work / f"{name}-torch"
            save_model(model, torch_dir, tokenizer, overwrite=True)
            export_onnx(torch_dir, ExportConfig(), work / f"{name}-onnx", overwrite=True)
            optimize_onnx(work / f"{name}-onnx", OptimizeConfig(), optimized, overwrite=True)
        graphs[name] = optimized
    return graphs


def weight_matmul_flops(path: Path, batch: int, seq: int) -> float:
    """2 * tokens * K * N over MatMuls by constant weights (fused Attention's packed weight included)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    flops = 0.0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Attention") and len(node.input) > 1 and node.input[1] in inits:
            dims = inits[node.input[1]].dims
            if len(dims) == 2:
                flops += 2.0 * batch * seq * dims[0] * dims[1]
    return flops


def profile(path: Path, threads: int, batch: int, seq: int, runs: int = 5) -> dict[str, float]:
    """Share of kernel time per operator type, from ONNX Runtime's profiler."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = synthetic_inputs(session, batch, seq, vocab=vocab_size(path.parent))
        for _ in range(runs):
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    total = sum(per_op.values()) or 1.0
    return {op: dur / total for op, dur in sorted(per_op.items(), key=lambda kv: -kv[1])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=EMBEDDED_MODEL)
    p.add_argument("--work", default=str(HERE.parent / ".cache" / "bench-latency"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--grid-batches", default="1,8,32", help="batch sizes of the grid")
    p.add_argument("--grid-seqs", default="32,128", help="sequence lengths of the grid")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--grid-rounds", type=int, default=20)
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    graphs = build(work, a.model, KEEPS)
    fusions = {name: json.loads((path / "manifest.json").read_text())["fusions"] for name, path in graphs.items()}

    main_run = measure_latency(graphs, batch_sizes=(a.batch,), seq_lens=(a.seq,), threads=a.threads,
                               warmup=a.warmup, rounds=a.rounds)
    cell = main_run["cells"][0]
    base_flops = weight_matmul_flops(graphs["baseline"] / "model.onnx", a.batch, a.seq)
    rows = []
    for name in graphs:
        ratio = cell["ratios"].get(name, {"p50": 1.0, "p10": 1.0, "p90": 1.0})
        rows.append({
            "graph": name, **cell["models"][name], "ratio_p50": ratio["p50"],
            "ratio_per_round_p10_p90": [ratio["p10"], ratio["p90"]],
            "weight_matmul_flop_ratio": weight_matmul_flops(graphs[name] / "model.onnx", a.batch, a.seq) / base_flops,
            "fusions": fusions[name],
        })
    sizes = [int(x) for x in a.grid_batches.split(",")]
    lengths = [int(x) for x in a.grid_seqs.split(",")]
    grid_run = measure_latency(graphs, batch_sizes=sizes, seq_lens=lengths, threads=a.threads, warmup=2,
                               rounds=a.grid_rounds)
    grid = [{"batch": c["batch"], "sequence": c["sequence"], "baseline_p50_ms": c["models"]["baseline"]["p50_ms"],
             **{f"{n}_ratio": r["p50"] for n, r in c["ratios"].items()}} for c in grid_run["cells"]]
    profiles = {name: profile(path / "model.onnx", a.threads, a.batch, a.seq) for name, path in graphs.items()}

    result = {
        "benchmark": "latency", "model": a.model, "provider": "CPUExecutionProvider", "threads": a.threads,
        "batch": a.batch, "sequence": a.seq, "warmup": a.warmup, "rounds": a.rounds,
        "environment": main_run["environment"], "main": rows, "grid": grid, "profiles": profiles,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps(result, indent=2))
    (out / "latency.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = [
        f"Latency, {r['model']}, {r['provider']}, {r['threads']} threads, batch {r['batch']} x sequence "
        f"{r['sequence']}, {r['rounds']} interleaved rounds after {r['warmup']} warm-up",
        "",
        "| graph | p50 ms | p90 ms | p99 ms | ratio (p50) | per-round ratio p10-p90 | weight-matmul FLOP ratio "
        "| fused |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in r["main"]:
        fused = ", ".join(f"{k} {v}" for k, v in row["fusions"].items() if v)
        lo, hi = row["ratio_per_round_p10_p90"]
        lines.append(f"| {row['graph']} | {row['p50_ms']:.1f} | {row['p90_ms']:.1f} | {row['p99_ms']:.1f} | "
                     f"{row['ratio_p50']:.3f} | {lo:.3f}-{hi:.3f} | {row['weight_matmul_flop_ratio']:.3f} | {fused} |")
    names = [k for k in r["grid"][0] if k.endswith("_ratio")]
    lines += ["", "Ratio to the baseline's median over the grid:", "",
              "| batch x sequence | baseline p50 ms | " + " | ".join(n.replace("_ratio", "") for n in names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for g in r["grid"]:
        lines.append(f"| {g['batch']} x {g['sequence']} | {g['baseline_p50_ms']:.1f} | "
                     + " | ".join(f"{g[n]:.3f}" for n in names) + " |")
    lines += ["", "Share of kernel time per operator (ONNX Runtime profiler, main shape):", ""]
    ops = sorted({op for prof in r["profiles"].values() for op in prof},
                 key=lambda op: -max(prof.get(op, 0) for prof in r["profiles"].values()))[:10]
    lines += ["| operator | " + " | ".join(r["profiles"]) + " |", "|---|" + "---:|" * len(r["profiles"])]
    for op in ops:
        lines.append(f"| {op} | " + " | ".join(f"{prof.get(op, 0):.3f}" for prof in r["profiles"].values()) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
