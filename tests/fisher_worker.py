"""Run under torchrun: each rank collects Fisher on its shard; rank 0 saves the all-reduced result."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoTokenizer

sys.path.insert(0, sys.argv[2])
from conftest import tiny_model, toy_data  # noqa: E402
from fwsvd_deploy import FisherConfig, collect_fisher  # noqa: E402
from fwsvd_deploy.modeling import embedded_model_dir  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    tokenizer = AutoTokenizer.from_pretrained(str(embedded_model_dir()))
    result = collect_fisher(tiny_model("bert"), toy_data(), tokenizer, FisherConfig(num_samples=None, batch_size=5),
                            max_length=32, progress=False)
    if dist.get_rank() == 0:
        save_file(result.fisher, sys.argv[1], metadata={"num_examples": str(result.num_examples)})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
