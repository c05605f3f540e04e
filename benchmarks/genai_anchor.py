"""Our decoders against onnxruntime-genai's on the same device: its model builder's graph, timed in its own loop.

onnxruntime-genai is what decoders are deployed with on ONNX Runtime. Its model builder
(``python -m onnxruntime_genai.models.builder``) writes its own graph of a Hugging Face model (q, k and v as one
MatMul, ``GroupQueryAttention``, the cache in one buffer that past and present share) and its ``Generator`` runs
the decode loop. This benchmark builds the dense model with the builder, then times, on the same prompt and token
counts, batch 1:

- ``genai builder``: the builder's graph in genai's loop, the anchor;
- each ``--graph NAME=FOLDER`` (an optimised folder of ours) in our loop (:class:`Generation`, what ``validate``
  times) and, since our folders carry ``genai_config.json``, in genai's loop as well (``NAME (genai loop)``): the
  graphs compared on one loop, and the loops on one graph.

Every generation is a prefill of ``--prompt-len`` tokens and ``--new-tokens`` decode steps; genai's first
``generate_next_token`` after the prompt only picks a token from the prefill's logits, so it is counted in the
prefill, and each later one is one decode step (a forward pass on one token, then its greedy pick). EOS is held
off by ``min_length``, so every generation has the same length. Rounds run every model's whole generation in turn,
the order alternating round by round: genai's sessions keep their threads spinning for a while after a call (it has
no setting to stop them, where our sessions stop at once), so interleaving call by call would charge that spin to
whichever model runs next.

The builder imports transformers classes newer than optimum-onnx's ``transformers<4.58`` pin, so it runs in a
virtual environment of its own that the benchmark makes (``--venv``; the packages in ``BUILDER_PACKAGES``); the
genai runtime (the ``genai`` extra, ``onnxruntime-genai``) runs here, beside our sessions, on the same ONNX Runtime.

    python benchmarks/genai_anchor.py --model MODEL_FOLDER --work runs/anchor \\
        --graph baseline=runs/smol/stages/optimize-baseline-... --graph keep-0.8=runs/smol/stages/optimize-candidate-...

Results: ``benchmarks/results/genai_anchor.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, graph_folders, provenance  # noqa: E402
from decode import describe as describe_graph  # noqa: E402

from fwsvd_deploy.exporters.genai import GENAI_FILE  # noqa: E402
from fwsvd_deploy.exporters.runtime import ONNX_FILE, make_session  # noqa: E402
from fwsvd_deploy.validators.decoder import DecoderGraph  # noqa: E402
from fwsvd_deploy.validators.generation import Generation, generation_tokens  # noqa: E402
from fwsvd_deploy.validators.latency import round_ratio, summarize  # noqa: E402

# The builder's environment: a genai release and the transformers it imports (torch: the local CPU build).
BUILDER_PACKAGES = ["onnxruntime-genai==0.18.0", "transformers>=5,<6", "torch==2.13.0", "onnx", "onnx-ir"]
ANCHOR = "genai builder"


def builder_env(venv: Path) -> Path:
    """The Python of ``venv``, made and given ``BUILDER_PACKAGES`` when it lacks them."""
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *BUILDER_PACKAGES],
                   check=True)
    return python


def builder_versions(python: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['onnxruntime-genai', 'transformers', 'torch', 'onnxruntime']}))")
    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


def build_anchor(python: Path, model: Path, out: Path, precision: str, log: Path) -> Path:
    """The builder's graph of ``model`` in ``out`` (kept and reused); its output goes to ``log``."""
    if (out / ONNX_FILE).is_file() and (out / GENAI_FILE).is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    with log.open("w") as f:
        subprocess.run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(model), "-o", str(tmp),
                        "-p", precision, "-e", "cpu", "-c", str(out.parent / "builder-cache")],
                       check=True, stdout=f, stderr=subprocess.STDOUT)
    tmp.rename(out)
    return out


def describe(folder: Path) -> dict[str, Any]:
    """decode.py's description of a graph, with its count of fused attention operators."""
    info = describe_graph(folder)
    fused = info["fused_operators"]
    return {**info, "attention": sum(fused.get(op, 0) for op in ("GroupQueryAttention", "MultiHeadAttention",
                                                                  "Attention"))}


class GenaiGeneration:
    """One genai generation of fixed prompt and length, callable repeatedly: ``calls()`` yields the prefill's time
    (ms; the prompt, then the pick from its logits) and then each decode step's."""

    def __init__(self, folder: Path, prompt: np.ndarray, new_tokens: int, threads: int) -> None:
        import onnxruntime_genai as og

        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.og, self.model = og, og.Model(config)
        self.prompt = prompt.astype(np.int32)
        self.new_tokens = new_tokens
        self.length = len(prompt) + new_tokens + 1

    def calls(self) -> Iterator[float]:
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=self.length, min_length=self.length)
        generator = self.og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(self.prompt)
        generator.generate_next_token()
        yield (time.perf_counter() - start) * 1000
        for _ in range(self.new_tokens):
            start = time.perf_counter()
            generator.generate_next_token()
            yield (time.perf_counter() - start) * 1000
        if generator.token_count() != self.length or not generator.is_done():
            raise RuntimeError(f"genai generated {generator.token_count()} tokens, not {self.length}")


def measure(runners: dict[str, Any], warmup: int, rounds: int) -> dict[str, list[tuple[float, list[float]]]]:
    """Whole generations, every model in turn, the order alternating round by round."""
    order = list(runners)
    results: dict[str, list[tuple[float, list[float]]]] = {name: [] for name in order}
    for i in range(warmup + rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            prefill_ms, *decode_ms = runners[name].calls()
            if i >= warmup:
                results[name].append((prefill_ms, decode_ms))
        print(f"round {i + 1}/{warmup + rounds}", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True, help="the Hugging Face folder the builder builds from")
    ap.add_argument("--graph", action="append", required=True, metavar="NAME=FOLDER",
                    help="an optimised decoder folder of ours; the first is our dense baseline")
    ap.add_argument("--work", type=Path, required=True, help="where the builder's environment and graph go")
    ap.add_argument("--venv", type=Path, default=None, help="the builder's virtual environment (default WORK/venv)")
    ap.add_argument("--precision", default="fp32", choices=["fp32"], help="the builder's precision (our graphs' own)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    graphs = graph_folders(ap, args.graph)
    if not (args.model / "config.json").is_file():
        ap.error(f"--model {args.model}: give a Hugging Face model folder (config.json and weights)")
    for name, folder in graphs.items():
        if not (folder / GENAI_FILE).is_file():
            ap.error(f"--graph {name}: {folder} has no {GENAI_FILE} (optimise it with --genai)")
    args.work.mkdir(parents=True, exist_ok=True)
    python = builder_env(args.venv or args.work / "venv")
    anchor = build_anchor(python, args.model, args.work / f"builder-{args.precision}", args.precision,
                          args.work / "builder.log")
    import onnxruntime_genai as og

    info = {ANCHOR: describe(anchor)} | {name: describe(folder) for name, folder in graphs.items()}
    sessions = {}
    for name, folder in graphs.items():
        session = make_session(folder / ONNX_FILE, "cpu", threads=args.threads, spin_after_run=False)
        sessions[name] = (session, DecoderGraph.from_session(session, folder))
    vocab = next(iter(sessions.values()))[1].vocab
    tokens = generation_tokens(vocab, 1, args.prompt_len + args.new_tokens)
    runners: dict[str, Any] = {ANCHOR: GenaiGeneration(anchor, tokens[0, :args.prompt_len], args.new_tokens,
                                                       args.threads)}
    for name, folder in graphs.items():
        runners[name] = Generation(*sessions[name], tokens, args.prompt_len, "cpu")
        runners[f"{name} (genai loop)"] = GenaiGeneration(folder, tokens[0, :args.prompt_len], args.new_tokens,
                                                          args.threads)
    runs = measure(runners, args.warmup, args.rounds)
    per_round = {name: [float(np.mean(d)) for _, d in r] for name, r in runs.items()}
    prefill = {name: [p for p, _ in r] for name, r in runs.items()}
    baseline = next(iter(graphs))
    timing = {name: {"prefill": summarize(prefill[name]), "decode": summarize([ms for _, d in r for ms in d]),
                     "decode_per_round": summarize(per_round[name]),
                     "decode_vs_anchor": round_ratio(per_round[name], per_round[ANCHOR]),
                     "decode_vs_baseline": round_ratio(per_round[name], per_round[baseline])}
              for name, r in runs.items()}
    result = {**provenance("genai_anchor.py", argv), "model": str(args.model), "builder": {
        "python": str(python), "packages": BUILDER_PACKAGES, "versions": builder_versions(python),
        "precision": args.precision, "execution_provider": "cpu"}, "runtime_genai": og.__version__,
        "prompt_tokens": args.prompt_len, "new_tokens": args.new_tokens, "batch": 1, "threads": args.threads,
        "warmup": args.warmup, "rounds": args.rounds, "graphs": info, "timing": timing, "baseline": baseline}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "genai_anchor.json").write_text(json.dumps(result, indent=2))
    (args.out / "genai_anchor.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict[str, Any]) -> str:
    base = r["baseline"]
    lines = ["# Against onnxruntime-genai (its model builder and generate loop)", "", f"`{r['command']}`", "",
             f"{r['date']}, commit {r['commit']}, {r['machine']}, device {r['device']}, {r['threads']} threads. "
             f"Builder: onnxruntime-genai {r['builder']['versions']['onnxruntime-genai']} with transformers "
             f"{r['builder']['versions']['transformers']} in its own environment, precision "
             f"{r['builder']['precision']}; runtime: onnxruntime-genai {r['runtime_genai']}.", "",
             f"Batch 1, a {r['prompt_tokens']}-token prompt, {r['new_tokens']} decode steps; {r['rounds']} rounds "
             f"after {r['warmup']} warm-up, whole generations in turn, the order alternating. Ratios: of the medians "
             "over rounds of each round's mean decode step (10th-90th percentile of the per-round ratio).", "",
             "| graph, loop | nodes | MatMuls | attention ops | weights read MB | prefill ms (p50) | "
             "decode ms/token (mean) | vs genai builder | vs our baseline |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, t in r["timing"].items():
        g = r["graphs"][name.removesuffix(" (genai loop)")]
        vs_anchor = "" if name == ANCHOR else _ratio(t["decode_vs_anchor"])
        vs_base = "" if name == base else _ratio(t["decode_vs_baseline"])
        lines.append(f"| {name} | {g['nodes']:,} | {g['matmuls']} | {g['attention']} | {g['weight_bytes'] / 1e6:.1f} "
                     f"| {t['prefill']['p50_ms']:.1f} | {t['decode']['mean_ms']:.2f} | {vs_anchor} | {vs_base} |")
    ratio = r["timing"][base]["decode_vs_anchor"]["p50"]
    lines += ["", f"Our dense baseline in our loop: **{ratio:.3f}x** genai's decode time per token "
              f"({'within' if ratio <= 1.1 else 'beyond'} the 1.1x target)."]
    return "\n".join(lines) + "\n"


def _ratio(r: dict[str, float]) -> str:
    return f"{r['p50']:.3f} ({r['p10']:.3f}-{r['p90']:.3f})"


if __name__ == "__main__":
    raise SystemExit(main())
