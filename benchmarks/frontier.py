"""The size / quality frontier: dense and low-rank graphs, float32 and with int8 / 8-bit / 4-bit weights.

Takes optimised float32 folders (the ``optimize-*`` stages of ``fwsvd-deploy run``), the first the dense baseline,
and builds from the export folder each was optimised from (its manifest says which) the quantised variants: int8
dynamic, 8-bit (``int8w``) and 4-bit ``MatMulNBits`` at block 32 for every graph, by round to nearest and by HQQ
(``hqq``), int4 at block 64 too for the first (128 does not divide SmolLM2's hidden size, 576); ``--variants`` picks
some of them. Then per graph:

* size on disk, and the bytes of weights a decode step reads, by kind (float / int8 / int4 / scales);
* decoders: perplexity on --windows held-out windows of the built-in convention speeches (the test split, the
  pipeline's windows), top-1 agreement with the first graph, and CPU decode ms per token (a prefill of --prompt-len,
  --new-tokens steps, batch 1, every graph interleaved call by call, --rounds rounds); encoders: accuracy on the
  Rotten Tomatoes validation split and agreement with the first graph's predictions;
* whether it lies on the measured frontier: no other graph is both smaller on disk and better (lower perplexity,
  higher accuracy).

For int4 low-rank graphs it also gives the decode time against the dense graph quantised the same way divided by the
bytes read against it: 1.0 means the factorised graph is exactly as fast per byte as the dense one.

    fwsvd-deploy run --config examples/smollm2.yaml --out runs/smol        # keep 0.8; again with ratio 0.9, 0.6
    python benchmarks/frontier.py --work runs/frontier \\
        --graph dense=runs/smol/stages/optimize-baseline-* \\
        --graph keep-0.9=runs/smol/stages/optimize-candidate-<0.9> ...

Writes benchmarks/results/frontier.json, frontier.md and frontier.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx

from fwsvd_deploy.config import DataConfig, OptimizeConfig
from fwsvd_deploy.exporters import optimize_onnx
from fwsvd_deploy.exporters.quantize import weight_bytes
from fwsvd_deploy.manifest import read_manifest
from fwsvd_deploy.validators.memory import disk_bytes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import graph_folders, provenance  # noqa: E402

VARIANTS = {"int8": {"quantize": "int8"}, "int8w b32": {"quantize": "int8-weight", "block_size": 32},
            "int4 b32": {"quantize": "int4", "block_size": 32},
            "int4 hqq b32": {"quantize": "int4", "block_size": 32, "quantizer": "hqq"}}
# coarser blocks for the dense graph too: 64, not 128, which does not divide SmolLM2's hidden size (576 = 9 x 64)
DENSE_ONLY = {"int4 b64": {"quantize": "int4", "block_size": 64},
              "int4 hqq b64": {"quantize": "int4", "block_size": 64, "quantizer": "hqq"}}
NO_FLOORS = {"int8_min_sqnr_db": 0.0, "int8_min_agreement": 0.0, "int4_min_sqnr_db": 0.0, "int4_min_agreement": 0.0,
             "int8_atol": 1e3, "int4_atol": 1e3}


def build(folder: Path, settings: dict, work: Path, name: str) -> Path:
    source = (read_manifest(folder) or {}).get("input", {}).get("path")
    if not source or not Path(source, "model.onnx").is_file():
        raise SystemExit(f"{folder}: its manifest names no exported folder to quantise ({source!r})")
    out = work / name.replace(" ", "_")
    if not (out / "model.onnx").is_file():
        print(f"building {name} ...", flush=True)
        # every setting is measured: the parity floors are reported, not enforced, here
        optimize_onnx(source, OptimizeConfig(**settings, **NO_FLOORS), out, overwrite=True)
    return out


def parity_floor(folder: Path) -> dict | None:
    """The worst shape of the optimiser's parity check of a quantised graph against its float graph."""
    manifest = read_manifest(folder) or {}
    rows = (manifest.get("parity") or {}).get("shapes") or []
    if not rows or (manifest.get("quantization") or {}).get("scheme") is None or "sqnr_db" not in rows[0]:
        return None
    return {"sqnr_db": min(r["sqnr_db"] for r in rows), "agreement": min(r["agreement"] for r in rows)}


def on_frontier(points: dict[str, tuple[float, float]], lower_is_better: bool) -> dict[str, bool]:
    """``name -> (size, quality)``: whether no other point is at most as large and at least as good, and better in
    one of the two."""
    def better(a: float, b: float) -> bool:
        return a < b if lower_is_better else a > b

    return {name: not any(s <= size and not better(quality, q) and (s < size or better(q, quality))
                          for other, (s, q) in points.items() if other != name)
            for name, (size, quality) in points.items()}


def decoder_rows(graphs: dict[str, Path], args: argparse.Namespace) -> tuple[dict, dict]:
    from fwsvd_deploy.data import lm_windows, load_text
    from fwsvd_deploy.exporters.runtime import make_session
    from fwsvd_deploy.modeling import load_tokenizer
    from fwsvd_deploy.validators.decoder import DecoderGraph
    from fwsvd_deploy.validators.generation import measure_generation
    from fwsvd_deploy.validators.perplexity import onnx_perplexity, window_batch

    first = next(iter(graphs.values()))
    data = DataConfig(dataset="speeches", max_length=args.window)
    windows = lm_windows(load_text(data, "test"), load_tokenizer(str(first)), args.window, args.windows,
                         data.seed).numpy()
    sessions = {}
    for name, folder in graphs.items():
        session = make_session(folder / "model.onnx", "cpu", threads=args.threads, spin_after_run=False)
        sessions[name] = (session, DecoderGraph.from_session(session, folder))
    batch = min(len(windows), window_batch(8, windows.shape[1], sessions[next(iter(graphs))][1].vocab))
    print(f"perplexity of {len(graphs)} graphs on {len(windows)} windows ...", flush=True)
    measured = onnx_perplexity(sessions, windows, batch, progress=True)
    print("decode timing ...", flush=True)
    timing = measure_generation(graphs, batch_sizes=(1,), prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                                threads=args.threads, warmup=args.warmup, rounds=args.rounds, progress=True,
                                sessions=sessions)
    cell = timing["cells"][0]
    rows = {}
    for name in graphs:
        ratio = cell["ratios"].get(name)
        rows[name] = {"perplexity": measured["metrics"][name]["perplexity"],
                      "agreement": measured["agreement"].get(name, 1.0),
                      "decode_ms_per_token": cell["models"][name]["decode"]["mean_ms"],
                      "decode_ratio": ratio["decode"]["p50"] if ratio else 1.0}
    extra = {"windows": {"count": len(windows), "length": int(windows.shape[1])},
             "generation": {k: timing[k] for k in ("device", "threads", "prompt_tokens", "new_tokens", "rounds",
                                                   "warmup") if k in timing},
             "environment": timing.get("environment")}
    return rows, extra


def encoder_rows(graphs: dict[str, Path], args: argparse.Namespace) -> tuple[dict, dict]:
    from fwsvd_deploy.data import rotten_tomatoes_split
    from fwsvd_deploy.validators.accuracy import evaluate_onnx

    data = rotten_tomatoes_split("validation")
    rows, first = {}, None
    for name, folder in graphs.items():
        print(f"accuracy of {name} ...", flush=True)
        result = evaluate_onnx(folder, data, threads=args.threads, max_length=64)
        predicted = result.logits.argmax(-1)
        first = predicted if first is None else first
        rows[name] = {"accuracy": result.metrics["accuracy"], "agreement": float(np.mean(predicted == first))}
    return rows, {"examples": len(data.texts), "split": "rotten_tomatoes validation"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="append", required=True, metavar="NAME=FOLDER",
                    help="an optimised float32 folder; the first is the dense baseline")
    ap.add_argument("--work", type=Path, required=True, help="where the quantised graphs go (reused when present)")
    ap.add_argument("--name", default="frontier", help="results file stem (default: %(default)s)")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", default=",".join([*VARIANTS, *DENSE_ONLY]),
                    help="the quantised variants to build, comma-separated (default: all, %(default)s)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS and v not in DENSE_ONLY]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join([*VARIANTS, *DENSE_ONLY])}")
    given = graph_folders(ap, args.graph)
    args.work.mkdir(parents=True, exist_ok=True)
    graphs, meta = {}, {}
    for i, (name, folder) in enumerate(given.items()):
        graphs[f"{name} fp32"], meta[f"{name} fp32"] = folder, {"model": name, "weights": "fp32"}
        for variant, settings in {**VARIANTS, **(DENSE_ONLY if i == 0 else {})}.items():
            if variant not in chosen:
                continue
            key = f"{name} {variant}"
            graphs[key] = build(folder, settings, args.work, key)
            meta[key] = {"model": name, "weights": variant}
    decoder = (read_manifest(next(iter(given.values()))) or {}).get("kv_cache") is not None
    rows, extra = decoder_rows(graphs, args) if decoder else encoder_rows(graphs, args)
    for name, folder in graphs.items():
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        read = weight_bytes(model)
        rows[name] |= {**meta[name], "folder": str(folder), "disk_bytes": disk_bytes(folder),
                       "parity": parity_floor(folder),
                       "weight_bytes": read, "weight_bytes_total": sum(read.values())}
    quality = "perplexity" if decoder else "accuracy"
    frontier = on_frontier({n: (r["disk_bytes"], r[quality]) for n, r in rows.items()}, lower_is_better=decoder)
    dense = next(iter(given))
    for name, row in rows.items():
        row["on_frontier"] = frontier[name]
        row["dominated_by_dense"] = any(
            rows[o]["disk_bytes"] < row["disk_bytes"] and (
                rows[o][quality] < row[quality] if decoder else rows[o][quality] > row[quality])
            for o in rows if meta[o]["model"] == dense)
        base = f"{dense} {row['weights']}"  # the dense graph quantised the same way
        if decoder and row["weights"].startswith("int4") and row["model"] != dense and base in rows:
            time_ratio = row["decode_ms_per_token"] / rows[base]["decode_ms_per_token"]
            bytes_ratio = row["weight_bytes_total"] / rows[base]["weight_bytes_total"]
            row["vs_dense_int4"] = {"decode_ratio": time_ratio, "bytes_ratio": bytes_ratio,
                                    "per_byte": time_ratio / bytes_ratio}
    result = {**provenance("frontier.py", argv), "quality": quality, **extra, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    plot(result, args.out / f"{args.name}.png")
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    quality = r["quality"]
    decoder = quality == "perplexity"
    lines = [f"# Size / {quality} frontier", "", f"`{r['command']}`", "",
             f"{r['date']}, commit {r['commit']}, {r['machine']}, {r['device']}.", ""]
    if decoder:
        g = r["generation"]
        lines += [f"Perplexity on {r['windows']['count']} held-out windows of {r['windows']['length']} tokens "
                  f"(convention speeches, test split); decode: batch 1, a {g['prompt_tokens']}-token prompt, "
                  f"{g['new_tokens']} steps, {g['rounds']} rounds interleaved call by call, {g['threads']} threads. "
                  "Ratios against the first row.", "",
                  "| graph | disk MB | weights read MB (float / int8 / int4 / scales) | perplexity | top-1 agreement "
                  "| decode ms/token | decode ratio | parity vs its float graph (worst shape) | on frontier |",
                  "|---|---:|---|---:|---:|---:|---:|---|:---:|"]
    else:
        lines += [f"Accuracy on {r['examples']} reviews ({r['split']}).", "",
                  "| graph | disk MB | weights read MB (float / int8 / int4 / scales) | accuracy | agreement | "
                  "on frontier |", "|---|---:|---|---:|---:|:---:|"]
    for name, row in sorted(r["rows"].items(), key=lambda kv: kv[1]["disk_bytes"]):
        w = row["weight_bytes"]
        kinds = " / ".join(f"{w.get(k, 0) / 1e6:.1f}" for k in ("float", "int8", "int4", "scales"))
        mark = "yes" if row["on_frontier"] else ""
        if decoder:
            lines.append(f"| {name} | {row['disk_bytes'] / 1e6:.1f} | {kinds} | {row['perplexity']:.2f} | "
                         f"{row['agreement']:.4f} | {row['decode_ms_per_token']:.2f} | {row['decode_ratio']:.3f} | "
                         f"{_parity(row['parity'])} | {mark} |")
        else:
            lines.append(f"| {name} | {row['disk_bytes'] / 1e6:.1f} | {kinds} | {100 * row['accuracy']:.2f} | "
                         f"{row['agreement']:.4f} | {mark} |")
    low_rank_int4 = {n: row for n, row in r["rows"].items() if row["weights"].startswith("int4")
                     and n.split()[0] != next(iter(r["rows"])).split()[0]}
    on = [n for n, row in low_rank_int4.items() if not row["dominated_by_dense"]]
    lines += ["", "Low rank + int4 points that no dense point beats on both size and "
              f"{quality}: {', '.join(on) if on else 'none'}."]
    per_byte = {n: row["vs_dense_int4"] for n, row in r["rows"].items() if "vs_dense_int4" in row}
    if per_byte:
        lines += ["", "int4 low rank against the dense graph quantised the same way (decode time ratio / bytes-read "
                  "ratio; 1.0 = as fast per byte):", ""]
        lines += [f"- {n}: decode {v['decode_ratio']:.3f}, bytes {v['bytes_ratio']:.3f}, per byte {v['per_byte']:.3f}"
                  for n, v in per_byte.items()]
    return "\n".join(lines) + "\n"


def _parity(p: dict | None) -> str:
    return "" if p is None else f"{p['sqnr_db']:.1f} dB, {p['agreement']:.3f}"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = r["quality"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"fp32": "o", "int8": "s", "int8w b32": "D", "int4 b32": "^", "int4 b64": "v"}
    models = list(dict.fromkeys(row["model"] for row in r["rows"].values()))
    for i, model in enumerate(models):
        for row in r["rows"].values():
            if row["model"] == model:
                ax.scatter(row["disk_bytes"] / 1e6, row[quality], marker=markers.get(row["weights"], "o"),
                           color=f"C{i}", label=f"{model}" if row["weights"] == "fp32" else None)
                ax.annotate(row["weights"], (row["disk_bytes"] / 1e6, row[quality]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    on = sorted((row["disk_bytes"] / 1e6, row[quality]) for row in r["rows"].values() if row["on_frontier"])
    if on:
        ax.step([p[0] for p in on], [p[1] for p in on], where="post", color="black", linewidth=0.8,
                label="frontier")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(quality)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
