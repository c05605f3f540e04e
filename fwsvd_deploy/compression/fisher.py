"""Empirical Fisher of every targeted weight, from task-loss gradients on labelled data.

``per_example`` (default) is the empirical Fisher ``F_ij = sum_n (dL_n/dW_ij)^2``: each example's
weight gradient is rebuilt from the layer's input and output gradient (``g_n^T x_n``), squared and
summed, so one forward/backward pass per batch serves all examples of the batch. ``batch_mean`` squares
the gradient of each batch's mean loss instead: cheaper, a different estimator, offered by name only.

Runs data-parallel under ``torchrun``/``accelerate launch``: with ``torch.distributed`` initialised,
each rank takes every ``world_size``-th example and the sums are all-reduced. Results are cached to a
safetensors file keyed by model, data and settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import FisherConfig
from ..data import TaskData
from ..errors import FisherError, first_line
from ..losses import loss_kind, per_example_losses  # also importable from here, as before
from ..manifest import model_fingerprint
from ..progress import progress_bar
from .apply import Target, resolve_targets

CACHE_FORMAT = 1
_CHUNK_BYTES = 256 * 2**20


@dataclass(frozen=True)
class FisherResult:
    """Fisher statistics by module name, each shaped like that module's weight (float32).

    ``targets`` names the layers the statistics were collected for, in model order; :func:`compress` checks that
    they cover its own targets, so the targets are chosen once.
    """

    fisher: dict[str, torch.Tensor]
    num_examples: int
    estimator: str
    seconds: float
    from_cache: bool = False
    cache_path: str | None = None
    key: str | None = None
    targets: tuple[str, ...] = ()


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _Accumulator:
    """Hooks that turn each target's input and output gradient into squared weight gradients."""

    def __init__(self, targets: list[Target], estimator: str) -> None:
        self.targets = {t.name: t for t in targets}
        self.estimator = estimator
        self.sums = {t.name: torch.zeros_like(t.module.weight, dtype=torch.float32) for t in targets}
        self.calls: dict[str, int] = {}
        self._pending: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> _Accumulator:
        for name, target in self.targets.items():
            self._handles.append(target.module.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _forward_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self.calls[name] = self.calls.get(name, 0) + 1
            if not output.requires_grad:
                return
            x = args[0].detach()
            output.register_hook(lambda grad: self._accumulate(name, x, grad.detach()))

        return hook

    def _accumulate(self, name: str, x: torch.Tensor, grad: torch.Tensor) -> None:
        batch = x.shape[0]
        x = x.reshape(batch, -1, x.shape[-1]).float()
        g = grad.reshape(batch, -1, grad.shape[-1]).float()
        # Weight gradient of example b: g_b^T x_b for a Linear (out, in), x_b^T g_b for a Conv1D (in, out).
        left, right = (x, g) if self.targets[name].kind == "conv1d" else (g, x)
        acc = self.sums[name]
        if self.estimator == "batch_mean":
            # the backward pass ran on the batch-mean loss, so this is already the mean gradient
            grad_sum = torch.einsum("bto,bti->oi", left, right)
            if self.calls.get(name, 1) > 1:  # shared weight (e.g. ALBERT): sum all uses, square at the end
                self._pending[name] = self._pending.get(name, 0) + grad_sum
                return
            contribution = grad_sum.square()
        elif self.calls.get(name, 1) > 1:
            # A weight used several times per forward (ALBERT shares its layers): an example's gradient is
            # the sum over all uses, so per-example gradients are summed first and squared in finish_batch.
            self._pending[name] = self._pending.get(name, 0) + torch.einsum("bto,bti->boi", left, right)
            return
        else:
            per = max(1, _CHUNK_BYTES // (4 * acc.numel()))
            contribution = torch.zeros_like(acc)
            for start in range(0, batch, per):
                chunk = torch.einsum("bto,bti->boi", left[start:start + per], right[start:start + per])
                contribution += chunk.square().sum(0)
        self._add(name, contribution)

    def _add(self, name: str, contribution: torch.Tensor) -> None:
        if not torch.isfinite(contribution).all():
            raise FisherError(f"gradient of {name} is NaN or inf; check the data, labels and model weights")
        self.sums[name] += contribution

    def finish_batch(self) -> None:
        """Square and add the per-example gradients of shared weights, summed over their uses."""
        for name, pending in self._pending.items():
            squared = pending.square()
            self._add(name, squared if squared.dim() == 2 else squared.sum(0))
        self._pending.clear()

    def reset_calls(self) -> None:
        self.calls.clear()


def _cache_key(model: nn.Module, data: TaskData, targets: list[Target], cfg: FisherConfig,
               max_length: int, world_size: int) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "model": model_fingerprint(model),
        "data": data.fingerprint(),
        "targets": [t.name for t in targets],
        "estimator": cfg.estimator,
        "max_length": max_length,
    }
    if cfg.estimator == "batch_mean":
        payload["batching"] = [cfg.batch_size, world_size]
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _load_cache(path: Path, targets: list[Target]) -> dict[str, torch.Tensor] | None:
    """The cached statistics, or ``None`` on a miss; an unreadable file is a miss (and is rewritten)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error type for truncated or foreign files
        logging.getLogger("fwsvd_deploy").warning("Fisher cache file %s is unreadable (%s); recomputing it",
                                                  path, first_line(exc))
        return None
    if set(tensors) != {t.name for t in targets}:
        return None
    return tensors


def check_cache_dir(cache_dir: str | Path | None) -> None:
    """Refuse, before any work, a Fisher cache path that is a file or cannot be created.

    Raises:
        FisherError: naming the path and what is wrong with it.
    """
    if cache_dir is None:
        return
    path = Path(cache_dir).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FisherError(f"Fisher cache path {path} is not a folder ({probe} is a file); give a folder, or 'none'")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise FisherError(f"Fisher cache folder {path} is not writable; give another, or 'none'")


def _save_cache(path: Path, fisher: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in fisher.items()}, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def collect_fisher(
    model: nn.Module,
    data: TaskData,
    tokenizer: Any,
    cfg: FisherConfig | None = None,
    *,
    target_modules: str | tuple[str, ...] | list[str] = "all-linear",
    exclude_modules: str | tuple[str, ...] | list[str] | None = None,
    targets: list[Target] | None = None,
    max_length: int = 128,
    seed: int = 0,
    progress: bool | None = None,
) -> FisherResult:
    """Estimate the empirical Fisher of every targeted weight.

    Args:
        model: a sequence classifier or causal LM.
        data: labelled examples (``cfg.num_samples`` of them are drawn, seeded).
        tokenizer: the model's tokenizer.
        cfg: estimator, sample count, batch size and cache folder.
        target_modules / exclude_modules: which layers, as in :func:`resolve_targets`.
        targets: layers already resolved with :func:`resolve_targets` (instead of the patterns).
        max_length: tokenizer truncation length.
        seed: seed of the subset of ``cfg.num_samples`` examples.
        progress: show a progress bar (``None``: only on a terminal).

    Returns:
        A :class:`FisherResult`; ``from_cache`` tells whether the backward passes were skipped.

    Raises:
        FisherError: on non-finite gradients, a model without a task loss, or a cache path that is a file.
    """
    cfg = cfg or FisherConfig()
    kind = loss_kind(model)
    check_cache_dir(cfg.cache_dir)
    if targets is None:
        targets = resolve_targets(model, target_modules, exclude_modules)
    names = tuple(t.name for t in targets)
    data = data.sample(cfg.num_samples, seed=seed)
    if len(data) == 0:
        raise FisherError("no examples to estimate Fisher from")
    rank, world = _dist()

    key = cache_path = None
    if cfg.cache_dir is not None:
        key = _cache_key(model, data, targets, cfg, max_length, world)
        cache_path = Path(cfg.cache_dir) / f"fisher-{key}.safetensors"
        cached = _load_cache(cache_path, targets)
        if cached is not None:
            return FisherResult(cached, len(data), cfg.estimator, 0.0, True, str(cache_path), key, names)

    start = time.perf_counter()
    shard = data.shard(rank, world) if world > 1 else data
    was_training = model.training
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    target_weights = {id(t.module.weight) for t in targets}
    model.eval()
    for p in model.parameters():
        p.requires_grad_(id(p) in target_weights)
    try:
        with _Accumulator(targets, cfg.estimator) as acc:
            bar = progress_bar(shard.batches(tokenizer, cfg.batch_size, max_length),
                               progress=progress if rank == 0 else False,
                               total=shard.num_batches(cfg.batch_size), desc="Fisher", unit="batch")
            for batch in bar:
                acc.reset_calls()
                losses = per_example_losses(model, batch, kind)
                if not torch.isfinite(losses).all():
                    raise FisherError("the task loss is NaN or inf on a calibration batch")
                total = losses.mean() if cfg.estimator == "batch_mean" else losses.sum()
                total.backward()
                acc.finish_batch()
                for t in targets:
                    t.module.weight.grad = None
                bar.set_postfix(loss=f"{float(losses.detach().mean()):.4f}")
            sums = acc.sums
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags[name])
        model.train(was_training)

    count = torch.tensor(len(shard), dtype=torch.long)
    if world > 1:
        for tensor in sums.values():
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.SUM)
    seconds = time.perf_counter() - start
    if cache_path is not None and rank == 0:
        _save_cache(cache_path, sums, {"key": key or "", "num_examples": str(int(count)),
                                       "estimator": cfg.estimator})
    if world > 1:
        torch.distributed.barrier()
    path = None if cache_path is None else str(cache_path)
    return FisherResult(sums, int(count), cfg.estimator, seconds, False, path, key, names)
