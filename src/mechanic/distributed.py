"""Data-parallel work over torch.distributed ranks (torchrun; gloo on CPU, NCCL on GPU): split, run, gather.

Every rank runs the same program. Work over examples is split into contiguous, deterministic shards
(`bounds`, `shard`); each rank computes its shard and `run` gathers every rank's result in rank order,
so the caller combines them exactly as one process would have. A rank that raises does not leave the
others waiting in a collective: `run` gathers its error too and every rank raises a DistributedError
that names it. Only torch.distributed moves data; this module imports nothing else from mechanic.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

_LOCAL = contextvars.ContextVar("mechanic_distributed_local", default=False)


class DistributedError(RuntimeError):
    """A rank failed (raised, or stopped answering) during data-parallel work."""


# ---------------------------------------------------------------- who am I
def is_distributed() -> bool:
    """True inside a process group of more than one rank (torchrun, or init_process_group by hand)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def active() -> bool:
    """True when public entry points should split their work: distributed, and not already inside a shard."""
    return is_distributed() and not _LOCAL.get()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world() -> int:
    """The number of ranks (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, the rank that writes files and prints (and in a single process)."""
    return rank() == 0


def init(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR in the environment), once.

    backend: default NCCL when CUDA is available, else gloo. Returns is_distributed(). Without torchrun's
    variables (a plain single process) nothing happens.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return is_distributed()


@contextlib.contextmanager
def local():
    """Inside: entry points run on what they are given (one shard), without splitting it again."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


# ---------------------------------------------------------------- splitting
def bounds(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """[lo, hi) of rank r's contiguous shard of n items: sizes differ by at most one, lower ranks larger."""
    r = rank() if r is None else r
    w = world() if w is None else w
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return lo, lo + base + (1 if r < extra else 0)


def shard(items, r: int | None = None, w: int | None = None):
    """Rank r's contiguous part of a list, a tensor (first dim), a Task (subset) or a TaskBatch (select)."""
    n = items.n if hasattr(items, "select") and hasattr(items, "n") else len(items)
    lo, hi = bounds(n, r, w)
    if hasattr(items, "select") and hasattr(items, "n"):       # a TaskBatch
        return items.select(slice(lo, hi))
    if hasattr(items, "subset") and hasattr(items, "examples"):   # a Task
        return items.subset(hi - lo, lo)
    return items[lo:hi]


# ---------------------------------------------------------------- gathering
@dataclass
class _Failure:
    """What a rank that raised sends instead of its result."""

    rank: int
    kind: str
    message: str
    trace: str


def gather(obj) -> list:
    """Every rank's `obj` (any picklable value), in rank order, on every rank (all_gather_object)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world()
    try:
        dist.all_gather_object(out, obj)
    except RuntimeError as e:   # a rank died (killed, out of memory) instead of answering
        raise DistributedError(f"Rank {rank()} lost contact with another rank while gathering results ({e}). A rank "
                               "stopped: torchrun's summary above names it (look for 'Root Cause' and its rank); "
                               "finished stages of a recipe run are reused when you start it again.") from e
    return out


def run(fn, *args, **kwargs) -> list:
    """fn(*args, **kwargs) on every rank, its results in rank order on every rank; a rank's error is raised on all.

    Every rank reaches the gather even when fn raises, so no rank waits forever for a failed one; the
    DistributedError names each failed rank with its exception and the last lines of its traceback.
    """
    try:
        mine = fn(*args, **kwargs)
    except DistributedError:   # already gathered by a collective inside fn: every rank knows, gather no more
        raise
    except Exception as e:   # noqa: BLE001 - forwarded to every rank below
        if not is_distributed():
            raise
        mine = _Failure(rank(), type(e).__name__, str(e), "".join(traceback.format_exc().splitlines(True)[-6:]))
    parts = gather(mine)
    failed = [p for p in parts if isinstance(p, _Failure)]
    if failed:
        lines = "; ".join(f"rank {f.rank} raised {f.kind}: {f.message}" for f in failed)
        first = failed[0]
        raise DistributedError(f"{len(failed)} of {len(parts)} ranks failed: {lines}. Every rank stops here. "
                               f"Rank {first.rank}'s traceback ends:\n{first.trace}")
    return parts


def gather_rows(t: torch.Tensor | None) -> torch.Tensor:
    """Every rank's rows (dim 0) joined in rank order, on every rank: shards of per-example tensors -> the whole.

    Tensors go through all_gather (padded to the largest shard), not pickling; None is a shard of no rows.
    """
    if not is_distributed():
        return t
    meta = gather(None if t is None else (t.shape[0], tuple(t.shape[1:]), t.dtype))
    have = [x for x in meta if x is not None]
    if not have:
        raise DistributedError("gather_rows: no rank has any rows.")
    _, tail, dtype = have[0]
    sizes = [0 if x is None else x[0] for x in meta]
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    wire = torch.uint8 if dtype == torch.bool else dtype
    pad = torch.zeros((max(sizes), *tail), dtype=wire, device=dev)
    if t is not None and t.shape[0]:
        pad[: t.shape[0]] = t.to(dev, wire)
    out = [torch.empty_like(pad) for _ in sizes]
    try:
        dist.all_gather(out, pad)
    except RuntimeError as e:
        raise DistributedError(f"Rank {rank()} lost contact with another rank while gathering rows ({e}).") from e
    whole = torch.cat([o[:n] for o, n in zip(out, sizes)]).to(dtype)
    return whole.to(t.device) if t is not None else whole


def decide(value):
    """Rank 0's `value` on every rank (so all ranks take the same branch, e.g. reuse a finished stage or not)."""
    if not is_distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank is here (e.g. rank 0 has finished writing a stage the others read next)."""
    if is_distributed():
        dist.barrier()


def per_rank(fn) -> list:
    """[fn()] when not splitting (one process, or inside `local`); under torchrun every rank's fn() in rank order,
    on every rank (`run`: a rank that raises is named). For work that computes its own share and reduces the parts."""
    return run(fn) if active() else [fn()]


def each(jobs: list) -> list:
    """Every job's result (jobs: callables of no argument), in order; under torchrun the jobs are dealt round-robin
    over the ranks, each run whole by one rank (inside `local`), and the results gathered on every rank.

    A job's result is the one-process result bit for bit (the same computation); a rank that raises is named.
    """
    if not active():
        return [job() for job in jobs]
    r, w = rank(), world()

    def mine():
        with local():
            return {i: job() for i, job in enumerate(jobs) if i % w == r}
    parts = per_rank(mine)
    return [parts[i % w][i] for i in range(len(jobs))]


def weighted_mean(values: list[torch.Tensor], weights: list[int]) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i in float64, in the given order: per-shard means -> the mean over all items."""
    total = sum(weights)
    acc = None
    for v, w in zip(values, weights):
        if w:
            part = v.double() * w
            acc = part if acc is None else acc + part
    return acc / total


__all__ = ["DistributedError", "active", "barrier", "bounds", "decide", "each", "gather", "gather_rows", "init",
           "is_distributed", "is_main", "local", "per_rank", "rank", "run", "shard", "weighted_mean", "world"]
