"""Save -> load of compressed models, and outputs that are never half-written."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ARCHS, TOL, logits, tiny_causal_lm, tiny_model
from fwsvd_deploy import CompressionConfig, LowRankLinear, collect_fisher, compress, load_compressed, save_compressed
from fwsvd_deploy.errors import ModelLoadError, OutputExistsError
from fwsvd_deploy.outputs import atomic_output_dir


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_gives_identical_logits(arch, tokenizer, data, tmp_path):
    model = tiny_model(arch)
    fisher = collect_fisher(model, data, tokenizer, max_length=32)
    report = compress(model, CompressionConfig(method="fwsvd", ratio=0.3, allocation="fisher"), fisher)
    expected = logits(model, tokenizer, data)
    save_compressed(model, tmp_path / "m", tokenizer, report=report, metadata={"input_model_hash": "abc"})
    plan = json.loads((tmp_path / "m" / "compression.json").read_text())
    assert plan["method"] == "fwsvd" and plan["input_model_hash"] == "abc" and "torch" in plan["versions"]
    assert plan["format_version"] == 1  # no shared down-projection: readable by every version
    assert {k: v["rank"] for k, v in plan["layers"].items()} == report.ranks
    loaded = load_compressed(tmp_path / "m")
    torch.testing.assert_close(logits(loaded, tokenizer, data), expected, atol=TOL["reload"], rtol=0)
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == len(report.layers)


def test_tied_causal_lm_round_trip(tmp_path, tokenizer, data):
    model = tiny_causal_lm()
    compress(model, CompressionConfig(method="svd", rank=4))
    save_compressed(model, tmp_path / "lm", tokenizer)
    loaded = load_compressed(tmp_path / "lm")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    batch = next(data.batches(tokenizer, 4, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, loaded(input_ids=batch["input_ids"]).logits)


def test_a_folder_saved_in_bfloat16_loads_as_float32_parameters(tmp_path, tokenizer):
    model = tiny_causal_lm()
    compress(model, CompressionConfig(method="svd", rank=4))
    save_compressed(model.to(torch.bfloat16), tmp_path / "lm", tokenizer)
    loaded = load_compressed(tmp_path / "lm")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert all(torch.equal(p, model.state_dict()[name].float()) for name, p in loaded.state_dict().items()
               if name in model.state_dict())


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    model = tiny_model("bert")
    compress(model, CompressionConfig(method="svd"))
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_compressed(model, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    save_compressed(model, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "compression.json").exists()


def test_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "model.safetensors").write_text("partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_load_refuses_what_is_not_a_compressed_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not a compressed model"):
        load_compressed(tmp_path)
    (tmp_path / "compression.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_compressed(tmp_path)
    (tmp_path / "compression.json").write_text(json.dumps({"format": "fwsvd-deploy/compressed-model",
                                                           "format_version": 99}))
    with pytest.raises(ModelLoadError, match="upgrade"):
        load_compressed(tmp_path)


def test_joint_qkv_round_trip_keeps_the_shared_down(tmp_path, tokenizer, data):
    model = tiny_model("bert")
    report = compress(model, CompressionConfig(method="svd", ratio=0.5, qkv="joint"))
    expected = logits(model, tokenizer, data)
    save_compressed(model, tmp_path / "m", tokenizer, report=report)
    plan = json.loads((tmp_path / "m" / "compression.json").read_text())
    query = "bert.encoder.layer.0.attention.self.query"
    assert plan["layers"][f"{query[:-5]}key"]["shared_down"] == query and "shared_down" not in plan["layers"][query]
    assert plan["format_version"] == 2
    loaded = load_compressed(tmp_path / "m")
    attention = loaded.bert.encoder.layer[0].attention.self
    assert attention.query.down is attention.key.down is attention.value.down
    assert sum(p.numel() for p in loaded.parameters()) == report.model_params_after
    torch.testing.assert_close(logits(loaded, tokenizer, data), expected, atol=TOL["reload"], rtol=0)
    # a plan whose shared layer is missing is refused with the name
    del plan["layers"][query]
    (tmp_path / "m" / "compression.json").write_text(json.dumps(plan))
    with pytest.raises(ModelLoadError, match="shares the down-projection"):
        load_compressed(tmp_path / "m")


def test_overwrite_keeps_the_old_folder_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    """If the final rename fails, the folder that was there comes back, whole."""
    import os

    from fwsvd_deploy import outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    real = os.replace
    calls = []

    def fail_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the first moves the old folder aside, the second would put the new one in place
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", fail_second)
    with pytest.raises(OSError, match="disk full"), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert (out / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_truncated_weights_and_a_plan_that_disagrees_are_refused(tmp_path, tokenizer):
    model = tiny_model("bert")
    compress(model, CompressionConfig(method="svd", ratio=0.5))
    save_compressed(model, tmp_path / "m", tokenizer)
    plan_path = tmp_path / "m" / "compression.json"
    plan = json.loads(plan_path.read_text())
    first = next(iter(plan["layers"]))
    plan["layers"][first]["rank"] += 1
    plan_path.write_text(json.dumps(plan))
    with pytest.raises(ModelLoadError, match=f"weights do not match the plan .*size mismatch for {first}"):
        load_compressed(tmp_path / "m")
    plan["layers"][first]["rank"] -= 1
    plan_path.write_text(json.dumps(plan))
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="model.safetensors .*truncated or not safetensors"):
        load_compressed(tmp_path / "m")
