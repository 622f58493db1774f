"""Train dictionaries from text: one truncated forward feeds every dictionary; checkpoints resume exactly.

    from mechanic.features.train import train, DictConfig
    dicts = train(model, [DictConfig("L8.resid_post", "topk", expansion=16, k=32)], "runs/sae",
                  tokens=2_000_000)                     # text=None: the default corpus (features.corpus)

Writes `out/<label>/` (cfg.json + sae_weights.safetensors, SAELens format) per dictionary and
`out/train.json` (settings, a log of tokens, tokens/s, FVU, L0, dead fraction). With
`checkpoint_every` tokens it keeps `out/checkpoint/` (safetensors + JSON, no pickle), written only at
buffer-refill boundaries, where the whole state is the dictionaries, their optimisers, the kept half
of the buffer, the shuffle generator and the number of windows read: a run started again with the
same settings continues from it and ends with the same weights as an uninterrupted run (with forward_batch=None
it resumes even where less free memory gives another forward batch; the buffer then refills in other steps, so
the weights differ from an uninterrupted run's).

Under torchrun (torch.distributed initialised, e.g. `mechanic.distributed.init()`) the same call trains data-parallel:
each rank runs the forwards of its block of every forward batch's windows, the activations are joined so every rank
holds the one-process buffer, each rank steps on its block of each batch's rows with gradients summed by
DistributedDataParallel (see trainer.py), and rank 0 alone writes the files. The result is the one-process
training on the same tokens with sums reordered; a checkpoint resumes with any number of ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, save_file

from mechanic import distributed as D
from mechanic import memory
from mechanic.features.activations import ShuffleBuffer, SiteReader, text_windows
from mechanic.features.dictionary import Dictionary
from mechanic.features.errors import FeaturesError
from mechanic.features.hooknames import site_width
from mechanic.features.saelens import save
from mechanic.features.trainer import DictConfig, Trainer
from mechanic.progress import counter

__all__ = ["DictConfig", "train"]


def _settings(model, cfgs, tokens, batch_size, buffer_tokens, seq_len, forward_batch, seed, skip_first, text) -> dict:
    return {"model": model.name, "dictionaries": [c.to_json() for c in cfgs], "tokens": tokens,
            "batch_size": batch_size, "buffer_tokens": buffer_tokens, "seq_len": seq_len,
            "forward_batch": forward_batch, "seed": seed, "skip_first": skip_first,
            "text": "default corpus (GCIDE)" if text is None else
            f"token ids {tuple(text.shape)}, sum {int(text.sum())}" if isinstance(text, torch.Tensor) else
            [str(t) for t in text] if isinstance(text, (list, tuple)) and len(text) < 20 else str(type(text).__name__)}


def _key(settings: dict, forward_batch_asked: int | None) -> str:
    """What a checkpoint must match to resume: a hash of the settings with the forward batch as asked (None when
    chosen to fit the free memory, so a resume on a machine with less of it continues instead of refusing)."""
    asked = settings | {"forward_batch": forward_batch_asked}
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:16]


def train(model, dictionaries: DictConfig | Iterable[DictConfig], out, tokens: int = 1_000_000, text=None,
          batch_size: int = 4096, buffer_tokens: int = 2 ** 16, seq_len: int = 128, forward_batch: int | None = 16,
          checkpoint_every: int | None = None, seed: int = 0, skip_first: int = 1, progress: bool = True,
          on_step: Callable[[dict], None] | None = None) -> list[Dictionary]:
    """Train one or more dictionaries for `tokens` tokens of `text` (None: default corpus; paths; passages).

    Before anything is read, the run's peak memory is estimated (mechanic.memory.training_run; under torchrun each
    rank's) and checked against the budget (80% of the free memory, or MECHANIC_MEMORY_BUDGET): forward_batch=None
    takes the largest number of windows per forward that fits (on every rank); settings that do not fit raise
    MemoryPlanError saying which smaller forward_batch, buffer_tokens or batch_size would."""
    cfgs = [dictionaries] if isinstance(dictionaries, DictConfig) else list(dictionaries)
    if not cfgs:
        raise FeaturesError("Nothing to train: give at least one DictConfig.")
    labels = [c.label for c in cfgs]
    if len(set(labels)) != len(labels):
        raise FeaturesError(f"Two dictionaries share a name ({labels}); give them distinct name=.")
    if buffer_tokens < 2 * batch_size:
        raise FeaturesError(f"buffer_tokens ({buffer_tokens}) must hold at least two batches ({2 * batch_size}).")
    if tokens < batch_size:
        raise FeaturesError(f"tokens ({tokens}) is less than one batch ({batch_size}).")
    if D.active() and batch_size < D.world():
        raise FeaturesError(f"batch_size ({batch_size}) is smaller than the number of ranks ({D.world()}): every rank "
                            "needs rows of each batch; use a larger batch or fewer processes.")
    for c in cfgs:
        site_width(model, c.site)
        if c.out_site:
            site_width(model, c.out_site)
    reader = SiteReader(model, [s for c in cfgs for s in (c.site, c.out_site) if s], skip_first=skip_first)
    shapes = [(reader.widths[c.site], c.latents(reader.widths[c.site]), reader.widths[c.out_site or c.site],
               c.architecture, c.skip) for c in cfgs]
    asked = forward_batch
    forward_batch = _plan(model, shapes, list(reader.widths.values()), batch_size, buffer_tokens, seq_len,
                          forward_batch, skip_first, bool(checkpoint_every))
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(model, cfgs, tokens, batch_size, buffer_tokens, seq_len, forward_batch, seed, skip_first, text)
    key = _key(settings, asked)
    trainers = [Trainer(c, reader.widths[c.site], reader.widths[c.out_site or c.site], tokens, batch_size, seed + i)
                for i, c in enumerate(cfgs)]
    gen = torch.Generator().manual_seed(seed)
    buffer = ShuffleBuffer(reader.widths, buffer_tokens, gen)
    seen, windows_read, log, elapsed = 0, 0, [], 0.0
    ckpt = out / "checkpoint"
    if checkpoint_every and D.decide((ckpt / "state.json").exists()):   # every rank resumes, or none
        seen, windows_read, log, elapsed = _restore(ckpt, key, trainers, buffer, gen)
    stream = text_windows(model, text, "train", seq_len)
    for _ in range(windows_read):   # deterministic re-read up to where the checkpoint stopped
        if next(stream, None) is None:
            raise FeaturesError("The text is shorter than when the checkpoint was written; it changed.")
    bar = counter(f"training {len(trainers)} dictionar{'y' if len(trainers) == 1 else 'ies'}", tokens, show=progress,
                  unit="tok", initial=seen)
    t0, last_ckpt = time.perf_counter() - elapsed, seen
    exhausted = False
    while seen < tokens and not exhausted:
        while not buffer.full():   # fill in whole forwards so a resumed run reads the same windows in the same batches
            wins = [w for _, w in zip(range(forward_batch), stream)]
            if not wins:
                exhausted = True
                break
            windows_read += len(wins)
            buffer.add(reader.read_split(torch.stack(wins)))   # windows split over ranks when distributed
        if len(buffer) < batch_size:
            break
        for batch in buffer.take_half(batch_size):
            _step(trainers, batch)
            seen += batch_size
            rate = seen / max(1e-9, time.perf_counter() - t0)
            row = {"tokens": seen, "tokens_per_s": rate,
                   **{f"{t.cfg.label}.{k}": v for t in trainers for k, v in t.stats.items()}}
            if on_step is not None:
                on_step(row)
            if len(log) == 0 or seen - log[-1]["tokens"] >= max(batch_size, tokens // 200) or seen >= tokens:
                log.append(row)
            s = trainers[0].stats
            bar.update(batch_size, tok_s=round(rate), fvu=s["fvu"], l0=s["l0"], dead=s["dead"])
            if seen >= tokens:
                break
        batch = None     # its views would keep the half handed out alive through the next fill
        if checkpoint_every and seen - last_ckpt >= checkpoint_every and seen < tokens and D.is_main():
            _checkpoint(ckpt, key, settings, trainers, buffer, gen, seen, windows_read, log, time.perf_counter() - t0)
            last_ckpt = seen
    bar.close()
    if seen < tokens and progress and D.is_main():
        print(f"note: the text ran out after {seen:,} of {tokens:,} tokens; training stopped there.")
    done = [t.finished() for t in trainers]
    for d, t in zip(done, trainers):
        d.metadata.update({"trained_tokens": seen, "context_size": seq_len, "mechanic_training": t.cfg.to_json()})
    if D.is_main():   # every rank holds the same weights; one writes them
        for d, t in zip(done, trainers):
            save(d, out / t.cfg.label, model_name=model.name, overwrite=True)
        summary = {"settings": settings, "ranks": D.world() if D.active() else 1, "tokens_seen": seen,
                   "seconds": time.perf_counter() - t0, "tokens_per_s": seen / max(1e-9, time.perf_counter() - t0),
                   "log": log, "final": {t.cfg.label: t.stats for t in trainers}}
        (out / "train.json").write_text(json.dumps(summary, indent=1) + "\n")
        if ckpt.exists():
            shutil.rmtree(ckpt)
    D.barrier()       # the files exist when train returns on any rank
    return done


def _plan(model, shapes, widths, batch_size, buffer_tokens, seq_len, forward_batch, skip_first, checkpoint) -> int:
    """The forward batch memory.plan_training gives this rank; under torch.distributed every rank's plan (each with
    its own budget and peak: rank 0 writes the files) is gathered, so all read the smallest forward batch, and a
    refusal on any rank is raised on every rank."""
    try:
        mine = memory.plan_training(model, shapes, widths, batch_size, buffer_tokens, seq_len, forward_batch,
                                    skip_first, checkpoint, device=model.device)
    except memory.MemoryPlanError as e:
        if not D.active():
            raise
        mine = e
    plans = D.gather(mine) if D.active() else [mine]
    refused = [(r, p) for r, p in enumerate(plans) if isinstance(p, memory.MemoryPlanError)]
    if refused:
        r, e = refused[0]
        raise memory.MemoryPlanError(f"On rank {r} of {len(plans)}: {e}")
    return min(plans)


def _step(trainers: list[Trainer], batch: dict[str, torch.Tensor]) -> None:
    """One optimiser step of every dictionary on a batch of buffer rows (the first initialises it from them)."""
    for t in trainers:
        x = batch[t.cfg.site]
        y = batch[t.cfg.out_site] if t.cfg.out_site else x
        if t.opt is None:
            t.init_from(x, y)
        t.step(x, y)


def _checkpoint(ckpt: Path, key: str, settings, trainers, buffer, gen, seen, windows_read, log, elapsed) -> None:
    tensors: dict[str, torch.Tensor] = {f"buffer.{s}": r.contiguous() for s, r in buffer.rows.items()}
    tensors["generator"] = gen.get_state()
    scalars = {}
    for i, t in enumerate(trainers):
        ts, sc = t.state(f"d{i}")
        tensors.update(ts)
        scalars[f"d{i}"] = sc
    state = {"key": key, "settings": settings, "seen": seen, "windows_read": windows_read,
             "log": log, "elapsed": elapsed, "trainers": scalars}
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state))
    if ckpt.exists():
        old = ckpt.with_name(ckpt.name + ".old")
        os.replace(ckpt, old)
        os.replace(tmp, ckpt)
        shutil.rmtree(old)
    else:
        os.replace(tmp, ckpt)


def _restore(ckpt: Path, key: str, trainers, buffer, gen):
    state = json.loads((ckpt / "state.json").read_text())
    if state["key"] != key:
        raise FeaturesError(f"{ckpt} was written by a training with other settings; resume with the same "
                            "settings, or choose another output directory (or delete the checkpoint).")
    tensors = load_file(str(ckpt / "state.safetensors"))
    buffer.rows = {s: tensors[f"buffer.{s}"] for s in buffer.rows}
    gen.set_state(tensors["generator"])
    for i, t in enumerate(trainers):
        t.load_state(f"d{i}", tensors, state["trainers"][f"d{i}"])
    return state["seen"], state["windows_read"], state["log"], state["elapsed"]
