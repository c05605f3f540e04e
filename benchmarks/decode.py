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

Writes benchmarks/results/decode.json and decode.md (``--name`` another stem). With --packed each graph is also
optimised again with ``pack_matmuls: all`` (``optimize --pack-matmuls all``), with --packed-factors with
``pack_matmuls: factors``, and timed beside the others.

With ``--shape NAME`` (see ``shapes.py``: smollm2-135m, qwen2.5-0.5b, llama-3.2-1b, llama-2-7b, mistral-7b) the graphs
are built instead of given: a decoder of that published architecture with random weights, dense and factorised
at each of --keeps, exported with its cache and optimised into --work (reused by a later run; each stage in a
process of its own, its peak resident memory recorded beside the graphs and in the results), then timed the same
way. Those results go to benchmarks/results/decode-shapes.json and .md, one entry per shape and device,
with the bytes floor (weights read per token, candidate / baseline) beside each ratio:

    python benchmarks/decode.py --shape qwen2.5-0.5b --keeps 0.8,0.6 --batches 1
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
from common import graph_folders, provenance  # noqa: E402
from shapes import SHAPES, build, parameters, shape_config  # noqa: E402

BUILD_BYTES_PER_PARAMETER = 16  # peak resident memory of a stage building a shape's graphs, with a margin (shape_run)


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


VARIANTS = {  # --unfused / --packed: each graph optimised again from its exported folder with one setting changed
    "unfused": ("attention unfused", {"fuse_attention": False}),
    "packed": ("q/k/v and gate/up joined", {"pack_matmuls": "all"}),
    "packed_factors": ("down-projections joined", {"pack_matmuls": "factors"}),
}


def reoptimised(folder: Path, work: Path, variant: str) -> Path:
    """``folder`` optimised again from its exported graph with the default settings but ``VARIANTS[variant]``'s."""
    manifest = read_manifest(folder) or {}
    source = manifest.get("input", {}).get("path")
    if not source or not Path(source, "model.onnx").is_file():
        raise SystemExit(f"{folder}: its manifest names no exported folder to optimise again ({source!r})")
    out = work / f"{folder.name}-{variant.replace('_', '-')}"
    if not (out / "model.onnx").is_file():
        optimize_onnx(source, OptimizeConfig(**VARIANTS[variant][1]), out, overwrite=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="append", metavar="NAME=FOLDER",
                    help="an optimised decoder folder; the first is the baseline")
    ap.add_argument("--shape", choices=sorted(SHAPES), help="build the graphs: a published architecture, random "
                    "weights (instead of --graph)")
    ap.add_argument("--keeps", default="0.8,0.6", help="with --shape: the kept fractions to factorise at")
    ap.add_argument("--unfused", action="store_true", help="also time every graph with its attention unfused")
    ap.add_argument("--packed", action="store_true", help="also time every graph with the MatMuls that read one "
                    "tensor joined (optimize --pack-matmuls all: q/k/v, gate/up and their down-projections)")
    ap.add_argument("--packed-factors", action="store_true", help="also time every graph with the low-rank "
                    "down-projections that read one tensor joined (optimize --pack-matmuls factors)")
    ap.add_argument("--name", default="decode", help="results file stem (default: %(default)s)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None,
                    help="where the graphs optimised again go (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    if (args.shape is None) == (args.graph is None):
        ap.error("give --graph NAME=FOLDER (at least one) or --shape NAME, not both")
    if args.shape is not None:
        return shape_run(ap, args, argv)
    graphs = graph_folders(ap, args.graph)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        given = list(graphs.items())
        for variant, (label, _) in VARIANTS.items():
            if getattr(args, variant):
                graphs |= {f"{name} ({label})": reoptimised(folder, work, variant) for name, folder in given}
        info, timing = timed(graphs, args)
    result = {**provenance("decode.py", argv), "graphs": info, "generation": timing}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def timed(graphs: dict[str, Path], args: argparse.Namespace) -> tuple[dict, dict]:
    """Each graph described, with its weight bytes over the first's, and the generation timings of all."""
    info = {name: describe(folder) for name, folder in graphs.items()}
    timing = measure_generation(graphs, batch_sizes=tuple(int(b) for b in args.batches.split(",")),
                                prompt_len=args.prompt_len, new_tokens=args.new_tokens, threads=args.threads,
                                warmup=args.warmup, rounds=args.rounds, progress=True)
    base = info[next(iter(graphs))]["weight_bytes"]
    for name in info:
        info[name]["weight_bytes_ratio"] = info[name]["weight_bytes"] / base
    return info, timing


def _keeps(ap: argparse.ArgumentParser, text: str) -> list[float]:
    try:
        keeps = [float(k) for k in text.split(",")]
    except ValueError:
        keeps = []
    if not keeps or not all(0.0 < k < 1.0 for k in keeps):
        ap.error(f"--keeps {text!r}: give kept fractions in (0, 1), comma-separated")
    return keeps


def _peak_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _build_stage(name: str, keep: float | None, out: Path) -> int:
    from fwsvd_deploy.modeling import load_tokenizer

    build(name, keep, out, load_tokenizer("smollm2-135m"))  # the parity checks' tokens (shape_run checks the vocab)
    return _peak_bytes()


def _export_stage(model_dir: Path, out: Path) -> int:
    from fwsvd_deploy.config import ExportConfig
    from fwsvd_deploy.exporters import export_onnx

    export_onnx(model_dir, ExportConfig(task="text-generation-with-past"), out, overwrite=True)
    return _peak_bytes()


def _optimize_stage(exported: Path, out: Path) -> int:
    optimize_onnx(exported, OptimizeConfig(), out, overwrite=True)
    return _peak_bytes()


def _in_child(function, *args) -> int:
    """``function(*args)`` in a fresh process: each stage's peak memory is its own (none left from the last)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def shape_graphs(name: str, keeps: list[float], work: Path) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
    """The optimised dense and factorised graphs of shape ``name``, built into ``work`` (kept, reused), and the
    peak resident memory of each stage that built them (``{label: {stage: bytes}}``, kept beside them)."""
    graphs, peaks = {}, {}
    root = work / name
    for keep in [None, *keeps]:
        label = "baseline" if keep is None else f"keep-{keep:g}"
        optimised = root / f"{label}-opt"
        record = root / f"{label}-peaks.json"
        peak = json.loads(record.read_text()) if record.is_file() else {}
        if not (optimised / "model.onnx").is_file():
            model_dir, exported = root / label, root / f"{label}-onnx"
            if not model_dir.is_dir():  # written whole or not at all (save_model's temporary folder)
                peak["build"] = _in_child(_build_stage, name, keep, model_dir)
            if not (exported / "model.onnx").is_file():
                peak["export"] = _in_child(_export_stage, model_dir, exported)
            peak["optimize"] = _in_child(_optimize_stage, exported, optimised)
            record.write_text(json.dumps(peak))
        graphs[label], peaks[label] = optimised, peak
    return graphs, peaks


def shape_run(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    keeps = _keeps(ap, args.keeps)
    config = shape_config(args.shape)
    if config.vocab_size < 49152:
        ap.error(f"--shape {args.shape}: its vocabulary ({config.vocab_size}) is smaller than the SmolLM2 "
                 "tokenizer's the parity checks use")
    if args.prompt_len + args.new_tokens > config.max_position_embeddings:
        ap.error(f"--prompt-len + --new-tokens = {args.prompt_len + args.new_tokens} is beyond {args.shape}'s "
                 f"{config.max_position_embeddings} positions")
    # measured on qwen2.5-0.5b (0.49 B parameters) at keep 0.8, each stage in its own process: export peaked at
    # 6.23 GB (12.6 bytes per parameter, inside optimum's exporter), optimize at 5.14 GB (its two parity sessions)
    need = BUILD_BYTES_PER_PARAMETER * parameters(config)
    import psutil

    if need > psutil.virtual_memory().total:
        ap.error(f"--shape {args.shape}: {parameters(config) / 1e9:.2f} B parameters need about {need / 2**30:.0f} "
                 f"GiB to build in float32 here ({BUILD_BYTES_PER_PARAMETER} bytes per parameter: 12.6 measured on "
                 f"qwen2.5-0.5b, with a margin), more than this machine's "
                 f"{psutil.virtual_memory().total / 2**30:.0f} GiB")
    work = args.work or Path(tempfile.gettempdir()) / "fwsvd-shapes"
    graphs, peaks = shape_graphs(args.shape, keeps, work)
    info, timing = timed(graphs, args)
    for label, peak in peaks.items():
        info[label]["build_peak_bytes"] = peak
    entry = {"shape": args.shape, "parameters": parameters(config), "keeps": keeps,
             **provenance("decode.py", argv), "graphs": info, "generation": timing}
    path = args.out / "decode-shapes.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs = [r for r in runs if (r["shape"], r["generation"]["device"]) != (args.shape, timing["device"])] + [entry]
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2))
    (args.out / "decode-shapes.md").write_text(shapes_markdown(runs))
    print(shapes_markdown([entry]))
    return 0


def shapes_markdown(runs: list[dict]) -> str:
    lines = ["# Decode speed at published sizes (random weights)", "",
             "Each decoder is built from its architecture's public config with random weights (speed depends on "
             "the graph's shapes, not on the values), factorised with uniform ranks (every layer keeps the same "
             "fraction of its parameters), exported with the KV cache and optimised as `fwsvd-deploy run` does "
             "(`benchmarks/shapes.py`). Decode: a prefill, then one token per step on the returned cache, "
             "interleaved call by call. The bytes floor is the candidate's weights read per token over the "
             "baseline's: what a memory-bound step can gain at best.", ""]
    for r in runs:
        g = r["generation"]
        env = g.get("environment", {})
        lines += [f"## {r['shape']} ({r['parameters'] / 1e9:.2f} B parameters), {g['device']}, {g['threads']} threads",
                  "", f"`{r['command']}` ({r['date']}, commit {r['commit']}, {r['machine']}, onnxruntime "
                  f"{env.get('versions', {}).get('onnxruntime')})", "",
                  f"Prefill {g['prompt_tokens']} tokens, then {g['new_tokens']} decode steps; {g['rounds']} rounds.",
                  "", "| batch | graph | weights read per token | bytes floor | decode ms/token | decode ratio | "
                  "ratio / floor | prefill ms | prefill ratio |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for cell in g["cells"]:
            for name, d in r["graphs"].items():
                m, ratio = cell["models"][name], cell["ratios"].get(name)
                floor = d["weight_bytes_ratio"]
                dec = f"**{ratio['decode']['p50']:.3f}**" if ratio else ""
                over = f"{ratio['decode']['p50'] / floor:.3f}" if ratio else ""
                pre = f"{ratio['prefill']['p50']:.3f}" if ratio else ""
                lines.append(f"| {cell['batch']} | {name} | {d['weight_bytes'] / 1e6:,.0f} MB | {floor:.3f} | "
                             f"{m['decode']['mean_ms']:.2f} | {dec} | {over} | {m['prefill']['p50_ms']:.1f} | {pre} |")
        built = [f"{name} " + ", ".join(f"{stage} {b / 1e9:.1f}" for stage, b in d["build_peak_bytes"].items())
                 for name, d in r["graphs"].items() if d.get("build_peak_bytes")]
        if built:
            lines += ["", "Peak resident memory of each stage that built the graphs, GB (one process per stage): "
                      + "; ".join(built) + "."]
        lines.append("")
    return "\n".join(lines)


def markdown(r: dict) -> str:
    g = r["generation"]
    names = list(r["graphs"])
    lines = [f"# Decode speed with the KV cache ({g['device']}, {g['threads']} threads)", "",
             f"`{r['command']}` — {r.get('date', '?')}, {r.get('machine', '?')}, commit {r.get('commit', '?')}", "",
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
