"""Run under torchrun: each rank calibrates on its share; rank 0 saves the all-reduced Fisher and input moments."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoTokenizer

sys.path.insert(0, sys.argv[2])
from conftest import tiny_model, toy_data  # noqa: E402
from fwsvd_deploy.compression import collect_statistics, resolve_targets  # noqa: E402
from fwsvd_deploy.modeling import embedded_model_dir  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    model = tiny_model("bert")
    batches = list(toy_data().batches(tokenizer, 5, 32))
    result = collect_statistics(model, batches, resolve_targets(model), kinds=("fisher", "inputs"), progress=False)
    if dist.get_rank() == 0:
        tensors = {f"fisher.{k}": v for k, v in result.fisher.items()}
        tensors.update({f"moment.{k}": v for k, v in result.second_moment.items()})
        tensors.update({f"abs.{k}": v for k, v in result.abs_sum.items()})
        meta = {"num_examples": str(result.num_examples), **{f"tokens.{k}": str(v) for k, v in result.tokens.items()}}
        save_file(tensors, sys.argv[1], metadata=meta)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
