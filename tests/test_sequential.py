"""Sequential calibration and the closed-form refit: math on hand-built tensors, the block loop, bad input."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from conftest import DECODERS, TOL, tiny_decoder, tiny_encoder, tiny_model, toy_data
from fwsvd_deploy import CalibrationConfig, CompressionConfig, compress
from fwsvd_deploy.cli import main
from fwsvd_deploy.compression import collect_statistics, resolve_targets
from fwsvd_deploy.compression.sequential import compress_sequential, find_blocks, supported_architectures
from fwsvd_deploy.compression.svd import refit_down, refit_up, whitened
from fwsvd_deploy.data import DataConfig, headlines_split, load_text, window_batches
from fwsvd_deploy.errors import ConfigError, DatasetError


def _problem(n=400, d=12, out=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    return x, w


def test_refit_up_is_the_least_squares_solution():
    x, w = _problem()
    x_dense = x + 0.1 * torch.randn_like(x)
    down = torch.randn(4, x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    n = x.shape[0]
    up, lam = refit_up(w, down, x_dense.T @ x / n, x.T @ x / n)
    # lstsq of the dense outputs on the reduced inputs
    reference = torch.linalg.lstsq(x @ down.T, x_dense @ w.T).solution.T
    assert lam == 0.0
    torch.testing.assert_close(up, reference, atol=TOL["identity"], rtol=TOL["identity_rel"])


def test_refit_up_leaves_whitened_factors_unchanged_on_their_own_inputs():
    x, w = _problem()
    c = x.T @ x / x.shape[0]
    up, down = whitened(w, c, damp=1e-12).factors(5, dtype=torch.float64)  # undamped: C itself
    refit, _ = refit_up(w, down, c, c)
    torch.testing.assert_close(refit, up, atol=TOL["identity"], rtol=TOL["identity_rel"])


def test_an_alternating_round_never_raises_the_error():
    x, w = _problem()
    x_dense = x + 0.3 * torch.randn_like(x)
    n = x.shape[0]
    c, cross = x.T @ x / n, x_dense.T @ x / n
    up, down = whitened(w, c).factors(4, dtype=torch.float64)

    def err(u, d):
        return float((x_dense @ w.T - x @ d.T @ u.T).square().sum())

    up1, _ = refit_up(w, down, cross, c)
    down2, _ = refit_down(w, up1, cross, c, damp=1e-12)
    up2, _ = refit_up(w, down2, cross, c)
    assert err(up1, down) <= err(up, down) + 1e-9
    assert err(up2, down2) <= err(up1, down) * (1 + 1e-9)


def test_a_singular_refit_system_is_damped_and_finite():
    x, w = _problem()
    c = x.T @ x / x.shape[0]
    down = torch.randn(1, x.shape[1], dtype=torch.float64).repeat(3, 1)  # three equal rows: rank 1
    up, lam = refit_up(w, down, c, c)
    assert lam > 0 and torch.isfinite(up).all()


def _batches(n=8, length=16):
    ids = torch.randint(5, 100, (n, length), generator=torch.Generator().manual_seed(0))
    return window_batches(ids, 4), ids


@pytest.mark.parametrize("arch", DECODERS)
def test_sequential_without_refit_on_block_zero_equals_one_pass(arch):
    """Block 0's attention input is the dense model's, so its q/k/v factors equal the one-pass ones; the layers
    after them (and the later blocks) are fitted to what the compressed layers before them give."""
    model = tiny_decoder(arch)
    batches, ids = _batches()
    stats = collect_statistics(model, batches, resolve_targets(model), kinds=("fisher", "inputs"), progress=False)
    cfg = CompressionConfig(method="fisher-whitened", ratio=0.6)
    one, seq = copy.deepcopy(model), copy.deepcopy(model)
    r1 = compress(one, cfg, stats)
    r2 = compress_sequential(seq, cfg, batches, stats, progress=False)
    assert r1.ranks == r2.ranks and r2.settings["sequential"] is True
    assert r2.model_params_after == r1.model_params_after
    name, blocks = find_blocks(seq)
    first = [n for n, m in seq.named_modules() if n.startswith(f"{name}.0.") and hasattr(m, "down")
             and n.endswith(("q_proj", "k_proj", "v_proj", "c_attn"))]
    assert first
    for n in first:
        a, b = one.get_submodule(n), seq.get_submodule(n)
        torch.testing.assert_close(a.up.weight @ a.down.weight, b.up.weight @ b.down.weight, atol=1e-4, rtol=1e-3)
    later = [n for n, m in seq.named_modules() if n.startswith(f"{name}.{len(blocks) - 1}.") and hasattr(m, "down")]
    assert any(not torch.allclose(one.get_submodule(n).down.weight, seq.get_submodule(n).down.weight, atol=1e-6)
               for n in later), "the last block was fitted to the dense inputs"
    with torch.no_grad():
        assert torch.isfinite(seq(input_ids=ids).logits).all()


@pytest.mark.parametrize("refit", ["up", "alternate"])
def test_sequential_refit_brings_the_output_closer_to_the_dense_model(refit):
    model = tiny_decoder("llama")
    batches, ids = _batches()
    stats = collect_statistics(model, batches, resolve_targets(model), kinds=("inputs",), progress=False)
    with torch.no_grad():
        dense = model(input_ids=ids).logits
    errors = {}
    for variant in ("none", refit):
        m = copy.deepcopy(model)
        compress_sequential(m, CompressionConfig(method="svd-llm", ratio=0.5, refit=variant), batches, stats,
                            progress=False)
        with torch.no_grad():
            errors[variant] = float((m(input_ids=ids).logits - dense).square().mean())
    assert errors[refit] < errors["none"]


def test_sequential_on_an_encoder_with_padding_and_offload(tmp_path, tokenizer):
    model = tiny_model("bert")
    batches = list(toy_data(16).batches(tokenizer, 8, 32))
    stats = collect_statistics(model, batches, resolve_targets(model), kinds=("inputs",), progress=False)
    offload = tmp_path / "offload"
    report = compress_sequential(model, CompressionConfig(method="svd-llm", ratio=0.5, refit="up"), batches, stats,
                                 offload_dir=offload, progress=False)
    assert report.settings["block_forwards"] > 0
    assert offload.is_dir() and not any(offload.iterdir()), "the temporary activations are removed"


def test_uniform_svd_llm_needs_no_dense_statistics():
    model = tiny_decoder("qwen2")
    batches, _ = _batches()
    report = compress_sequential(model, CompressionConfig(method="svd-llm", ratio=0.5, allocation="uniform"),
                                 batches, None, progress=False)
    assert any(layer.rank is not None for layer in report.layers)


def test_albert_and_targets_outside_the_blocks_are_refused():
    with pytest.raises(ConfigError, match="shares? weights|share weights.*supports"):
        find_blocks(tiny_encoder("albert", "text-classification"))
    assert "llama" in supported_architectures() and "albert" not in supported_architectures()
    model = tiny_model("bert")
    with pytest.raises(ConfigError, match="pooler.dense is outside the transformer blocks"):
        compress_sequential(model, CompressionConfig(method="svd", ratio=0.5, allocation="uniform",
                                                     target_modules=("query", "pooler.dense")), [], None)


def test_config_checks():
    with pytest.raises(ConfigError, match="refit"):
        CompressionConfig(refit="both")
    with pytest.raises(ConfigError, match="offload_dir"):
        CalibrationConfig(offload_dir="/tmp/x")
    assert CompressionConfig(method="svd", refit="up").statistics == ("inputs",)
    assert CalibrationConfig.from_dict({"sequential": True}).sequential is True


def _cli(capsys, *argv):
    code = main(["--quiet", *argv])
    return code, *capsys.readouterr()


def test_cli_sequential_compress(capsys, tmp_path, tiny_llama_dir, toy_text):
    code, out, err = _cli(capsys, "compress", "--model", str(tiny_llama_dir), "--dataset", str(toy_text),
                          "--ratio", "0.5", "--max-length", "32", "--calibration-samples", "8",
                          "--calibration-batch-size", "4", "--calibration-cache", "none", "--sequential",
                          "--refit", "up", "--offload-dir", str(tmp_path / "off"), "--out", str(tmp_path / "c"))
    assert code == 0, err
    assert "sequential:" in (tmp_path / "c" / "compression_report.md").read_text()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_cli_unwritable_offload_dir_is_exit_2(capsys, tmp_path, tiny_llama_dir, toy_text):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    code, out, err = _cli(capsys, "compress", "--model", str(tiny_llama_dir), "--dataset", str(toy_text),
                          "--sequential", "--offload-dir", str(locked / "x"), "--out", str(tmp_path / "c"))
    assert code == 2 and "offload" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_cli_offload_dir_that_is_a_file_is_exit_2(capsys, tmp_path, tiny_llama_dir, toy_text):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, out, err = _cli(capsys, "compress", "--model", str(tiny_llama_dir), "--dataset", str(toy_text),
                          "--sequential", "--offload-dir", str(blocker), "--out", str(tmp_path / "c"))
    assert code == 2 and "offload" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_cli_sequential_on_albert_is_exit_2_before_calibration(capsys, tmp_path, toy_csv, tokenizer):
    folder = tmp_path / "albert"
    tiny_encoder("albert", "text-classification").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    code, out, err = _cli(capsys, "compress", "--model", str(folder), "--dataset", str(toy_csv), "--text-column",
                          "sentence", "--label-column", "sentiment", "--max-length", "32", "--sequential",
                          "--out", str(tmp_path / "c"))
    assert code == 2 and "albert" in err and "llama" in err, err
    assert not (tmp_path / "c").exists()


def test_headlines_corpus_splits_are_disjoint_days():
    splits = {s: headlines_split(s) for s in ("train", "validation", "test")}
    assert all(len(d) for d in splits.values())
    assert not set(splits["train"].documents) & set(splits["test"].documents)
    assert load_text(DataConfig(dataset="headlines"), "test").documents == splits["test"].documents
    with pytest.raises(DatasetError, match="splits"):
        headlines_split("dev")
