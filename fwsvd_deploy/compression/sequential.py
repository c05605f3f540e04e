"""Sequential calibration: the transformer blocks compressed in order, each fitted to what it will really see.

One loop over blocks (GPTQ's layer-wise driver, llm-compressor's sequential pipeline), the statistics -> factorise ->
apply way of :func:`~.apply.compress`, per block:

1. The calibration batches run up to the first block once; its inputs (and the keyword arguments the model gives
   every block: masks, rotary position embeddings) are kept. From then on only blocks run, one at a time.
2. Inside a block, the layers that read one tensor (q/k/v, gate/up, ...) are compressed together, in forward order:
   their input statistics ``C = E[x x^T]`` (and ``mean |x|``) are collected on the block as compressed so far, fed
   the outputs of the compressed blocks before it, so later layers are fitted to the error of earlier ones.
3. With a refit (``CompressionConfig.refit``) the dense block also runs, on the dense model's own activations, and
   the cross moment ``X = E[x_dense x^T]`` lets ``up`` (and ``down``) be solved against the dense layer's output:
   errors made upstream are corrected, not just carried.
4. The compressed block (and the dense copy) then run once more to give the next block its inputs.

Only one block's activations for the calibration windows are held at a time (two streams with a refit), in memory
or, with ``offload_dir``, in files of a temporary folder there. The ranks come from one global allocation over the
dense model's statistics (a greedy allocation compares every layer's spectrum, which no single block can), and the
Fisher row weights of ``fisher-whitened``/``fwsvd`` too: a Fisher needs a backward pass through every later block,
per block a full pass of the model.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import CompressionConfig
from ..errors import ConfigError, FisherError
from ..families import FAMILIES, family_of
from ..losses import accepted_inputs, forward_inputs
from ..progress import progress_bar
from .apply import (
    allocate,
    build_report,
    dense_layer_report,
    factorised,
    greedy,
    layer_report,
    refit,
    swap_modules,
    warn_damped,
)
from .factorize import UnitStats, allocation_gains, as_statistics, decompose_unit, require, unit_statistics
from .report import CompressionReport, LayerReport
from .statistics import CalibrationStats, check_cache_dir, real_rows
from .svd import RightFactor
from .targets import Target, Unit, plan_units, resolve_targets

Batch = dict[str, torch.Tensor]


def supported_architectures() -> list[str]:
    """Model types whose blocks sequential calibration can walk."""
    return sorted(f.model_type for f in FAMILIES.values() if f.blocks is not None)


def check_walkable(config: Any) -> Any:
    """The family of a transformers config, when sequential calibration can walk its blocks.

    Raises:
        ConfigError: for a family without separable blocks (ALBERT) or one not in the table, naming the supported.
    """
    family = family_of(config) if config is not None else None
    if family is None or family.blocks is None:
        kind = getattr(config, "model_type", None) or type(config).__name__
        why = "its layers share weights across depth" if family is not None else "its blocks are not known"
        raise ConfigError(f"sequential calibration cannot walk a {kind!r} model ({why}); it supports "
                          f"{', '.join(supported_architectures())}. Drop --sequential")
    return family


def find_blocks(model: nn.Module, targets: Sequence[Target] | None = None) -> tuple[str, nn.ModuleList]:
    """The name and ``ModuleList`` of the model's transformer blocks, from the family table.

    Raises:
        ConfigError: for a family without separable blocks (or not in the table), or targets outside the blocks.
    """
    family = check_walkable(getattr(model, "config", None))
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and (name == family.blocks or name.endswith("." + family.blocks))]
    if len(found) != 1:
        raise ConfigError(f"found {len(found)} block lists named {family.blocks!r} in {type(model).__name__}, "
                          "expected one; drop --sequential")
    name, blocks = found[0]
    if targets is not None:
        outside = [t.name for t in targets if not t.name.startswith(name + ".")]
        if outside:
            raise ConfigError(f"target {outside[0]} is outside the transformer blocks ({name}.N); sequential "
                              "calibration compresses block by block: narrow --targets, or drop --sequential")
    return name, blocks


def check_offload_dir(path: str | Path | None) -> None:
    """Refuse, before any work, an offload folder that is a file or cannot be written.

    Raises:
        ConfigError: naming the folder.
    """
    if path is None:
        return
    try:
        check_cache_dir(path, what="offload", alternative="")
    except FisherError as exc:
        raise ConfigError(str(exc)) from None


class _Stop(Exception):
    """Raised by a hook once it has what it came for, so nothing after it runs."""


class _Store:
    """One stream of a block's activations, one tensor per calibration batch, in memory or in files."""

    def __init__(self, folder: Path | None, name: str) -> None:
        self.folder, self.name = folder, name
        self.items: list[torch.Tensor | Path] = []

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if self.folder is None:
            self.items.append(tensor)
            return
        path = self.folder / f"{self.name}-{len(self.items)}.safetensors"
        save_file({"x": tensor.contiguous()}, str(path))
        self.items.append(path)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.items[i]
        return item if isinstance(item, torch.Tensor) else load_file(str(item))["x"]

    def clear(self) -> None:
        for item in self.items:
            if isinstance(item, Path):
                item.unlink(missing_ok=True)
        self.items.clear()


@dataclass
class _Moments:
    """One input group's sums over the calibration tokens of one block stage."""

    second: torch.Tensor | None = None  # sum x x^T (float64)
    cross: torch.Tensor | None = None  # sum x_dense x^T (float64), with a refit
    abs_sum: torch.Tensor | None = None
    tokens: int = 0

    def add(self, x: torch.Tensor, dense: torch.Tensor | None) -> None:
        x = x.float()
        if self.second is None:
            n = x.shape[1]
            self.second = torch.zeros(n, n, dtype=torch.float64)
            self.abs_sum = torch.zeros(n, dtype=torch.float64)
            self.cross = None if dense is None else torch.zeros(n, n, dtype=torch.float64)
        self.second += (x.T @ x).double()
        self.abs_sum += x.abs().sum(0, dtype=torch.float64)
        if dense is not None:
            self.cross += (dense.float().T @ x).double()
        self.tokens += x.shape[0]
        if not torch.isfinite(self.second).all():
            raise FisherError("a block's inputs have NaN or inf values during sequential calibration")


@dataclass
class SequentialRecord:
    """What the sequential pass did: block forwards, seconds, and the layers whose refit was damped."""

    forwards: int = 0
    seconds: float = 0.0
    damped: list[str] = field(default_factory=list)


def compress_sequential(
    model: nn.Module,
    cfg: CompressionConfig,
    batches: Sequence[Batch],
    statistics: CalibrationStats | None = None,
    *,
    offload_dir: str | Path | None = None,
    progress: bool | None = None,
) -> CompressionReport:
    """Factorise the targeted layers of ``model`` in place, block by block (see the module's description).

    Args:
        model: a model of a family whose blocks are known (:func:`supported_architectures`).
        cfg: what to factorise and how far; ``cfg.refit`` adds the dense stream and the least-squares refit.
        batches: the calibration batches (the ones ``statistics`` were collected on).
        statistics: the dense model's statistics: the greedy allocations' spectra and the Fisher row weights
            (``None`` when the method and allocation need neither: uniform or fixed ranks of ``svd``/``svd-llm``/
            ``asvd``).
        offload_dir: a folder for the activations (a temporary subfolder, removed at the end), or ``None``.
        progress: a progress bar over the blocks (``None``: only on a terminal).

    Raises:
        ConfigError: an architecture whose blocks cannot be walked, targets outside them, an unwritable folder.
        FisherError: missing dense statistics, or non-finite activations.
        NumericalError: a refit factor that is not finite (naming the layer).
    """
    stats = as_statistics(statistics)
    targets = resolve_targets(model, cfg.target_modules, cfg.exclude_modules)
    blocks_name, blocks = find_blocks(model, targets)
    check_offload_dir(offload_dir)
    dense_needs = tuple(k for k in cfg.statistics if k == "fisher") + (("inputs",) if greedy(cfg) else ())
    if dense_needs:
        require(cfg, stats, model, dense_needs)
    if not batches:
        raise FisherError("no calibration examples")
    units = plan_units(targets, cfg.qkv)
    params_before = sum(p.numel() for p in model.parameters())
    ranks, chosen_dense = _plan(units, cfg, stats)
    record = SequentialRecord()
    start = time.perf_counter()
    layers: dict[str, LayerReport] = {}
    folder = None
    if offload_dir is not None:
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=".fwsvd-offload-", dir=offload_dir))
    try:
        runner = _BlockRunner(model, blocks_name, blocks, batches, folder, dense=cfg.refit != "none")
        by_block = _units_by_block(units, blocks_name, len(blocks))
        bar = progress_bar(range(len(blocks)), progress=progress, desc="Sequential", unit="block")
        for index in bar:
            for u, ustats, decomp_weight, up, down in runner.compress_block(
                    index, by_block[index], lambda u, s: _factors(u, s, cfg, stats, ranks, record)):
                if up is None:
                    layers[u.name] = dense_layer_report(u, ustats, u.name in chosen_dense, cfg)
                else:
                    layers[u.name] = layer_report(u, ranks[u.name], decomp_weight, up, down, ustats)
            runner.advance(index, last=index == len(blocks) - 1)
        record.forwards = runner.forwards
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    record.seconds = time.perf_counter() - start
    warn_damped(record.damped, cfg)
    ordered = [layers[u.name] for u in units]
    return build_report(model, cfg, ordered, params_before, sequential=True, sequential_seconds=record.seconds,
                        block_forwards=record.forwards)


def _plan(units: list[Unit], cfg: CompressionConfig, stats: CalibrationStats | None,
          ) -> tuple[dict[str, int | None], set[str]]:
    """The ranks, from the dense statistics' spectra (one unit's decomposition in memory at a time)."""
    if not greedy(cfg):
        return allocate(units, cfg, None)
    whitenings: dict[str, RightFactor] = {}
    gains = {}
    for u in units:
        ustats = unit_statistics(u, stats)
        gains[u.name] = allocation_gains(decompose_unit(u, cfg, ustats, whitenings), cfg, ustats)
    return allocate(units, cfg, gains)


def _units_by_block(units: list[Unit], blocks_name: str, count: int) -> list[list[Unit]]:
    out: list[list[Unit]] = [[] for _ in range(count)]
    for u in units:
        index = int(u.members[0].name[len(blocks_name) + 1:].split(".", 1)[0])
        out[index].append(u)
    return out


def _factors(u: Unit, moments: _Moments, cfg: CompressionConfig, stats: CalibrationStats | None,
             ranks: dict[str, int | None], record: SequentialRecord,
             ) -> tuple[UnitStats, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One unit's statistics on the sequential inputs, and its factors (``None`` when it stays dense)."""
    fisher = None if stats is None or stats.fisher is None else unit_statistics(u, _fisher_only(stats)).fisher
    n = max(moments.tokens, 1)
    assert moments.second is not None and moments.abs_sum is not None
    covariance = moments.second / n
    ustats = UnitStats(fisher=fisher, covariance=covariance, abs_mean=moments.abs_sum / n, group=u.name)
    weight = u.weight.detach().to(torch.float64)
    rank = ranks[u.name]
    if rank is None:
        return ustats, weight, None, None
    decomp = decompose_unit(u, cfg, ustats)
    up, down = decomp.factors(rank, dtype=torch.float64)
    if cfg.refit != "none":
        cross = covariance if moments.cross is None else moments.cross / n
        up, down, singular = refit(u.name, weight, up, down, cross, covariance, cfg, decomp.row_scale)
        if singular:
            record.damped.append(u.name)
    return ustats, weight, up, down


def _fisher_only(stats: CalibrationStats) -> CalibrationStats:
    return CalibrationStats(targets=stats.targets, fisher=stats.fisher)


class _BlockRunner:
    """Runs the blocks one at a time on the stored activations: the compressed stream, and the dense one."""

    def __init__(self, model: nn.Module, blocks_name: str, blocks: nn.ModuleList, batches: Sequence[Batch],
                 folder: Path | None, *, dense: bool) -> None:
        self.model, self.blocks_name, self.blocks, self.folder = model, blocks_name, blocks, folder
        self.masks = [b.get("attention_mask") for b in batches]
        self.forwards = 0
        self.inputs = _Store(folder, "x0")
        self.dense_inputs = _Store(folder, "d0") if dense else None
        self.kwargs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._capture(batches)
        self.dense_block: nn.Module | None = None

    def _capture(self, batches: Sequence[Batch]) -> None:
        """The first block's inputs and arguments for every batch, the model run only up to it."""

        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs.pop("hidden_states")
            self.inputs.append(hidden)
            self.kwargs.append((tuple(args[1:]), dict(kwargs)))
            raise _Stop

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in batches:
                inputs = forward_inputs(self.model, batch)
                if "use_cache" in accepted_inputs(self.model):
                    inputs["use_cache"] = False
                try:
                    with torch.no_grad():
                        self.model(**inputs)
                except _Stop:
                    continue
                raise FisherError("the model never ran its first block on a calibration batch")
        finally:
            handle.remove()
            self.model.train(was_training)
        if self.dense_inputs is not None:
            if self.folder is None:
                self.dense_inputs.items = list(self.inputs.items)  # the same tensors until block 0 changes
            else:
                for i in range(len(self.inputs)):
                    self.dense_inputs.append(self.inputs[i])

    def _run(self, block: nn.Module, i: int, x: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.kwargs[i]
        self.forwards += 1
        with torch.no_grad():
            out = block(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _groups(self, block: nn.Module, units: list[Unit]) -> list[list[Unit]]:
        """The block's units grouped by the tensor they read, in the order the forward reads them."""
        seen: dict[int, int] = {}
        order: list[tuple[int, Unit]] = []
        tensors: list[torch.Tensor] = []
        first = {id(u.members[0].module): u for u in units}

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            u = first[id(module)]
            key = id(args[0])
            if key not in seen:
                seen[key] = len(seen)
                tensors.append(args[0])  # held so that its id is not reused within the forward
            order.append((seen[key], u))

        handles = [u.members[0].module.register_forward_pre_hook(hook) for u in units]
        try:
            self._run(block, 0, self.inputs[0])
        finally:
            for h in handles:
                h.remove()
        missing = [u.name for u in units if all(v is not u for _, v in order)]
        if missing:
            raise FisherError(f"the block never ran {missing[0]} on the calibration inputs")
        groups: dict[int, list[Unit]] = {}
        for g, u in order:
            if all(v is not u for v in groups.get(g, [])):
                groups.setdefault(g, []).append(u)
        return [groups[g] for g in sorted(groups)]

    def _moments(self, block: nn.Module, owner: nn.Module, dense_owner: nn.Module | None) -> _Moments:
        """The statistics of ``owner``'s input over every batch, the block run only up to it."""
        moments = _Moments()
        grabbed: dict[str, torch.Tensor] = {}

        def grab(key: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                grabbed[key] = args[0]
                raise _Stop

            return hook

        handles = [owner.register_forward_pre_hook(grab("x"))]
        if dense_owner is not None:
            handles.append(dense_owner.register_forward_pre_hook(grab("dense")))
        try:
            for i in range(len(self.inputs)):
                grabbed.clear()
                if dense_owner is not None:
                    assert self.dense_inputs is not None and self.dense_block is not None
                    _until_stop(self._run, self.dense_block, i, self.dense_inputs[i])
                _until_stop(self._run, block, i, self.inputs[i])
                mask = self.masks[i]
                dense = None if "dense" not in grabbed else real_rows(grabbed["dense"], mask)
                moments.add(real_rows(grabbed["x"], mask), dense)
        finally:
            for h in handles:
                h.remove()
        return moments

    def compress_block(self, index: int, units: list[Unit], factors: Callable[..., Any]) -> Iterator[Any]:
        """Compress the block's units group by group; yields ``(unit, stats, weight, up, down)`` per unit."""
        block = self.blocks[index]
        if not units:
            return
        if self.dense_inputs is not None:
            self.dense_block = copy.deepcopy(block)
            dense_modules = dict(self.dense_block.named_modules())
        block_name = f"{self.blocks_name}.{index}"
        for group in self._groups(block, units):
            owner = group[0].members[0]
            dense_owner = None
            if self.dense_block is not None:
                dense_owner = dense_modules[owner.name[len(block_name) + 1:]]
            moments = self._moments(block, owner.module, dense_owner)
            replacements = {}
            done = []
            for u in group:
                ustats, weight, up, down = factors(u, moments)
                if up is not None:
                    replacements.update(factorised(u, up, down))
                done.append((u, ustats, weight, up, down))
            swap_modules(self.model, replacements)
            yield from done

    def advance(self, index: int, *, last: bool) -> None:
        """Run block ``index`` (compressed, and its dense copy) to give the next block its inputs."""
        if last:
            self.inputs.clear()
            if self.dense_inputs is not None:
                self.dense_inputs.clear()
            self.dense_block = None
            return
        block = self.blocks[index]
        nxt = _Store(self.folder, f"x{index + 1}")
        for i in range(len(self.inputs)):
            nxt.append(self._run(block, i, self.inputs[i]))
        if self.dense_inputs is not None:
            dense_block = self.dense_block if self.dense_block is not None else block
            dense_next = _Store(self.folder, f"d{index + 1}")
            for i in range(len(self.dense_inputs)):
                dense_next.append(self._run(dense_block, i, self.dense_inputs[i]))
            self.dense_inputs.clear()
            self.dense_inputs = dense_next
        self.inputs.clear()
        self.inputs = nxt
        self.dense_block = None


def _until_stop(run: Callable[..., Any], *args: Any) -> None:
    try:
        run(*args)
    except _Stop:
        return
    raise FisherError("a targeted layer was not reached in its block during sequential calibration")

