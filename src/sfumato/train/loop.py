"""The training loop: deterministic, resumable, optionally distributed (DDP over gloo on the CPU).

A stage hands the loop a :class:`Task`: an ``nn.Module`` whose ``forward(batch)`` returns the scalar
loss of one batch. Everything random is a pure function of ``(seed, step)``:

* the data order — epoch ``e`` visits the dataset in ``randperm(N, seed=(seed, e))`` order, and step
  ``s`` takes the next ``batch_size`` positions of that walk;
* per-sample randomness (noise, timesteps, caption dropout) — each sample gets its own seed
  ``mix(seed, step, position in the global batch)``, so a sample's randomness does not depend on
  how many processes share the batch.

Under ``torchrun`` each rank takes a disjoint, contiguous shard of every step's batch and DDP
averages the gradients. Checkpoints (model, optimizer, EMA, step and torch RNG state) are written
atomically every ``checkpoint_every`` steps; a restarted run continues from the last complete one
and ends bit-for-bit where an uninterrupted run ends.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..checkpoint.io import atomic_path, load_object
from ..errors import SfumatoError

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class LoopConfig:
    steps: int
    batch_size: int              # global batch, split across ranks
    lr: float
    seed: int = 0
    checkpoint_every: int = 500
    warmup: int = 0              # linear warm-up steps, then constant
    decay_start: int | None = None  # from this step, cosine decay to ``lr * final_lr`` at ``steps``
    final_lr: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0
    ema_decay: float | None = None
    log_every: int = 10
    progress: bool = True
    bf16: bool = False           # compute the loss under bf16 autocast (weights and optimizer stay fp32)


@dataclass(frozen=True)
class Batch:
    """One rank's share of a step: dataset indices and one seed per sample."""

    step: int
    indices: list[int]
    seeds: list[int]

    def generator(self, i: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seeds[i])


class Task(nn.Module):
    """A trainable stage: its parameters are the trained ones; ``forward(batch)`` is the loss."""

    dataset_size: int

    def forward(self, batch: Batch) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def mix(*values: int) -> int:
    """A 32-bit seed from integers (splitmix64); torch's CPU generator uses 32 bits of its seed."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & 0xFFFFFFFF


@lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix(seed, epoch, 0xDA7A)))


def step_batch(seed: int, step: int, batch_size: int, dataset_size: int, rank: int = 0, world: int = 1) -> Batch:
    """Rank ``rank``'s contiguous shard of step ``step``'s global batch (a pure function of its arguments)."""
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {world} processes")
    share = batch_size // world
    positions = range(rank * share, (rank + 1) * share)
    indices = []
    for j in positions:
        walk = step * batch_size + j
        indices.append(int(_epoch_order(seed, walk // dataset_size, dataset_size)[walk % dataset_size]))
    return Batch(step, indices, [mix(seed, step, j) for j in positions])


class EMA:
    """Exponential moving average of a module's floating-point parameters and buffers."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1 - self.decay)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        for k, v in sd.items():
            self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> nn.Module:
        """A copy of ``module`` holding the averaged weights."""
        out = copy.deepcopy(module)
        out.load_state_dict({**out.state_dict(), **self.shadow})
        return out


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group (gloo) when launched under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def learning_rate(cfg: LoopConfig, step: int) -> float:
    """The LR of 0-based ``step``: linear warm-up, constant, then an optional cosine tail."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else cfg.lr
    if cfg.decay_start is not None and step >= cfg.decay_start:
        t = (step - cfg.decay_start) / max(1, cfg.steps - cfg.decay_start)
        lr *= cfg.final_lr + (1 - cfg.final_lr) * 0.5 * (1 + math.cos(math.pi * t))
    return lr


def train(task: Task, cfg: LoopConfig, out_dir: str | Path | None, name: str,
          on_step: Callable[[int, float], None] | None = None) -> tuple[nn.Module, EMA | None]:
    """Run (or resume) ``cfg.steps`` steps of ``task``; returns the task and its EMA (if any). The one
    training loop: the bundled model's stages and every personalization trainer run through it.

    ``out_dir`` holds ``checkpoint.pt`` and the loss log ``{name}.jsonl`` (one JSON object per
    ``log_every`` steps: step, loss averaged over ranks, lr, seconds since the run started); None
    keeps the run in memory (no checkpoints, no resume). ``on_step(step, loss)`` sees every step's loss.
    """
    out_dir = Path(out_dir) if out_dir is not None else None
    rank, world = distributed()
    if rank == 0 and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(mix(cfg.seed, 0xC0FFEE))
    params = [p for p in task.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMA(task, cfg.ema_decay) if cfg.ema_decay is not None else None
    start = _resume(out_dir / CHECKPOINT, task, opt, ema) if out_dir is not None else 0
    log_path = out_dir / f"{name}.jsonl" if out_dir is not None else None
    if rank == 0 and log_path is not None:
        _truncate_log(log_path, start)
    model: nn.Module = nn.parallel.DistributedDataParallel(task) if world > 1 else task
    device = next(iter(params), torch.empty(0)).device.type
    bar = _progress(cfg, start, name, rank)
    t0 = time.time()
    for step in range(start, cfg.steps):
        lr = learning_rate(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device, torch.bfloat16, enabled=cfg.bf16):
            loss = model(step_batch(cfg.seed, step, cfg.batch_size, task.dataset_size, rank, world))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(task)
        done = step + 1
        if on_step is not None:
            on_step(done, float(loss.detach()))
        if done % cfg.log_every == 0 or done == cfg.steps:
            value = _mean_over_ranks(loss.detach(), world)
            if not math.isfinite(value):
                raise SfumatoError(f"{name}: the loss is {value} at step {done}: training diverged "
                                   "(try a lower learning rate)")
            if rank == 0 and log_path is not None:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": done, "loss": value, "lr": lr, "time": round(time.time() - t0, 2)}) + "\n")
            log.info("%s step %d/%d loss %.4f", name, done, cfg.steps, value)
            if bar is not None:
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if bar is not None:
            bar.update(1)
        if out_dir is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _save_checkpoint(out_dir / CHECKPOINT, task, opt, ema, done, rank, world)
    if bar is not None:
        bar.close()
    return task, ema


# -- checkpoints -------------------------------------------------------------------------------


def _save_checkpoint(path: Path, task: nn.Module, opt, ema: EMA | None, step: int, rank: int, world: int) -> None:
    if rank == 0:
        state = {
            "step": step,
            "model": task.state_dict(),
            "optimizer": opt.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "rng": torch.get_rng_state(),
        }
        atomic_torch_save(state, path)
    if world > 1:
        dist.barrier()


def atomic_torch_save(obj: object, path: Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _resume(path: Path, task: nn.Module, opt, ema: EMA | None) -> int:
    """The step a run stopped at, its state restored from ``path`` (through the allow-list); a state
    file that cannot be read or does not fit this run is a one-line SfumatoError."""
    if not path.exists():
        return 0
    state = load_object(path)
    try:
        task.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"])
        return int(state["step"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise SfumatoError(f"cannot resume from {path}: the saved state does not fit this run "
                           f"({type(e).__name__}); remove it to start over") from None


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (a killed run's tail)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _mean_over_ranks(loss: Tensor, world: int) -> float:
    if world > 1:
        loss = loss.clone()
        dist.all_reduce(loss)
        loss /= world
    return float(loss)


def _progress(cfg: LoopConfig, start: int, name: str, rank: int):
    if not cfg.progress or rank != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=start, desc=name, unit="step", file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 30.0, dynamic_ncols=True)
