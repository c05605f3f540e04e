"""How each low-rank layer's scale is split between its factors, against the quality of the quantised graph.

For each exported folder (``export-*`` stages of ``fwsvd-deploy run``, or ``fwsvd-deploy export``), each
quantisation (int8 per tensor, int8 per channel, int4 at block 32) and each factor split (``exported``,
``balanced``, ``svd``; see ``fwsvd_deploy.exporters.lowrank.resplit_factors``), the folder is optimised and
quantised, and the quantised graph is compared with the float graph it came from:

* decoders: the optimiser's own parity check (prefills of real prose and decode steps on the returned cache, at the
  optimiser's parity shapes): the logits' signal-to-noise ratio and top-1 next-token agreement, worst shape;
* encoders: the logits on --texts held-out Rotten Tomatoes reviews (the validation split): signal-to-noise and
  the share of reviews whose predicted class is unchanged.

The floors are turned off for the measurement (every setting is measured, none refused).

    python benchmarks/quantize_split.py --graph smollm2-keep0.8=runs/smol/stages/export-candidate-* \\
        --graph minilm-keep0.5=runs/minilm/stages/export-candidate-*

Writes benchmarks/results/NAME.json and NAME.md (--name, default quantize_split).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from fwsvd_deploy.config import OptimizeConfig
from fwsvd_deploy.exporters import optimize_onnx
from fwsvd_deploy.manifest import read_manifest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import graph_folders, provenance  # noqa: E402

SCHEMES = {"int8": {"quantize": "int8"}, "int8 per channel": {"quantize": "int8", "per_channel": True},
           "int4 block 32": {"quantize": "int4", "block_size": 32}}
SPLITS = ("exported", "balanced", "svd")
NO_FLOORS = {"int8_min_sqnr_db": 0.0, "int8_min_agreement": 0.0, "int4_min_sqnr_db": 0.0, "int4_min_agreement": 0.0,
             "int8_atol": 1e3, "int4_atol": 1e3}


def snr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    noise = float(np.sum((approx.astype(np.float64) - reference) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference.astype(np.float64) ** 2)) / noise)


def encoder_quality(reference: Path, candidate: Path, texts: list[str]) -> dict:
    from fwsvd_deploy.exporters.runtime import make_session, run_session
    from fwsvd_deploy.modeling import load_tokenizer

    tokenizer = load_tokenizer(str(reference))
    sessions = [make_session(p / "model.onnx", "cpu", spinning=False) for p in (reference, candidate)]
    names = [i.name for i in sessions[0].get_inputs()]
    want, got = [], []
    for start in range(0, len(texts), 32):
        batch = tokenizer(texts[start:start + 32], padding=True, truncation=True, max_length=64, return_tensors="np")
        inputs = {k: v.astype(np.int64) for k, v in batch.items() if k in names}
        want.append(run_session(sessions[0], inputs)["logits"])
        got.append(run_session(sessions[1], inputs)["logits"])
    w, g = np.concatenate(want), np.concatenate(got)
    return {"sqnr_db": snr_db(w, g), "agreement": float(np.mean(w.argmax(-1) == g.argmax(-1))), "examples": len(w)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="append", required=True, metavar="NAME=FOLDER", help="an exported folder")
    ap.add_argument("--texts", type=int, default=512, help="held-out reviews for encoders (default: %(default)s)")
    ap.add_argument("--name", default="quantize_split", help="results file stem (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args(argv)
    graphs = graph_folders(ap, args.graph)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in graphs.items():
            decoder = (read_manifest(folder) or {}).get("kv_cache") is not None
            texts = None
            if not decoder:
                from fwsvd_deploy.data import rotten_tomatoes_split

                texts = list(rotten_tomatoes_split("validation").texts[:args.texts])
                float_dir = Path(tmp, f"{name}-float")
                optimize_onnx(folder, OptimizeConfig(), float_dir)
            for scheme, settings in SCHEMES.items():
                for split in SPLITS:
                    out = Path(tmp, f"{name}-{scheme}-{split}".replace(" ", "_"))
                    result = optimize_onnx(folder, OptimizeConfig(**settings, factor_split=split, **NO_FLOORS), out)
                    if decoder:
                        shapes = result.parity["shapes"]
                        quality = {"sqnr_db": min(r["sqnr_db"] for r in shapes),
                                   "agreement": min(r["agreement"] for r in shapes), "shapes": len(shapes)}
                    else:
                        quality = encoder_quality(float_dir, out, texts)
                    q = result.quantization
                    row = {"graph": name, "scheme": scheme, "split": split, **quality,
                           "weight_bytes": q.weight_bytes, "factors_quantized": q.factors_quantized,
                           "low_rank_layers": result.low_rank_layers}
                    rows.append(row)
                    print(f"{name} {scheme} {split}: {quality['sqnr_db']:.2f} dB, agreement {quality['agreement']:.4f}",
                          flush=True)
    result = {**provenance("quantize_split.py", argv), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    lines = ["# Factor split against quantisation quality", "", f"`{r['command']}`", "",
             f"{r['date']}, commit {r['commit']}, {r['machine']}, {r['device']}.", "",
             "Decoders: worst parity shape of the optimiser's check (prefills and decode steps); encoders: logits on "
             "held-out reviews. Agreement: top-1 next token (decoders), predicted class (encoders).", "",
             "| graph | quantisation | split | logits SNR (dB) | agreement |", "|---|---|---|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['graph']} | {row['scheme']} | {row['split']} | {row['sqnr_db']:.2f} | "
                     f"{row['agreement']:.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
