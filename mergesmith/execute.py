"""Stream a plan's jobs with bounded memory.

Reading (a prefetch thread), computing (this thread, float32 on the chosen device) and writing (the
writer's thread) overlap. At most ``prefetch`` jobs' inputs are in memory at once, plus the output shard
being filled and the one being written: peak memory is O(models × largest tensor + one shard).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from mergesmith.checks import all_finite, check_device
from mergesmith.damage import DamageMeter, ModelDamage
from mergesmith.errors import CheckpointError, MergeError
from mergesmith.plan import Job, Plan, TensorInput, seed_for


@dataclass
class Stages:
    """Where a merge's seconds went: each thread's busy time, and what the computing thread waited for. The
    stages overlap (three threads), so they add up to more than the wall time when the overlap works; the
    largest busy stage bounds the merge."""

    read: float = 0.0  # reader thread: reading and checking the inputs and statistics
    waiting_for_reads: float = 0.0  # computing thread, idle until the reader hands it a job
    compute: float = 0.0  # computing thread: the merge arithmetic, to the output dtype
    damage: float = 0.0  # computing thread: predicting each model's damage
    waiting_for_writer: float = 0.0  # computing thread, handing results over (the writer's queue was full)
    write: float = 0.0  # writer thread: writing results to the shards
    finish: float = 0.0  # after the last tensor: the last writes, config, tokenizer and model card

    def line(self) -> str:
        parts = [("read", self.read, " (reader thread)"), ("merge", self.compute, ""),
                 ("damage", self.damage, ""), ("write", self.write, " (writer thread)"),
                 ("waited for reads", self.waiting_for_reads, ""),
                 ("waited for the writer", self.waiting_for_writer, ""), ("finish", self.finish, "")]
        return ", ".join(f"{name} {seconds:.2f} s{where}" for name, seconds, where in parts)


@dataclass
class MergeSummary:
    method: str
    models: list[str]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    output: str = ""
    files: list[str] = field(default_factory=list)
    solver: dict[str, dict[str, Any]] = field(default_factory=dict)  # per block: CG iterations and residuals
    fallback: list[str] = field(default_factory=list)  # tensors merged by the fallback, without statistics
    adapter: dict[str, Any] | None = None  # an adapter output: its rank, modules and truncation errors
    damage: list[ModelDamage] = field(default_factory=list)  # each model's predicted loss increase (sidecars)
    tuning: Any = None  # a recipe's tune: block's result (mergesmith.tune.TuneResult)
    layers: list[dict[str, float]] = field(default_factory=list)  # a layer-wise merge: seconds per layer
    stages: Stages = field(default_factory=Stages)


def run_job(job: Job, tensors: list[torch.Tensor], *, device: torch.device, compute_dtype: torch.dtype,
            seed: int, stats: list[dict[str, Any]] | None = None, report: dict[str, Any] | None = None,
            check_result: bool = True, factors: list[Any] | None = None) -> dict[str, torch.Tensor]:
    """Compute a job's output tensors from its loaded inputs (base first, when the job has one, then the
    companion's inputs), statistics and, for a factored job, each input's delta factors."""
    if not tensors[0].is_floating_point():
        # integer buffers (position ids, masks) are not averaged: they come from the base or first model
        return {job.name: tensors[0]}
    upcast = job.method.upcast_inputs
    work = [t.to(device=device, dtype=compute_dtype if upcast or i == 0 else None, non_blocking=True)
            for i, t in enumerate(tensors)]
    blocks = _as_blocks(job, work)
    base, others = (blocks[0], blocks[1:]) if job.base is not None else (None, blocks)
    generator = torch.Generator().manual_seed(seed_for(seed, job.name)) if job.method.random else None
    per_input = [{k: v.to(device=device, dtype=compute_dtype) if isinstance(v, torch.Tensor) else v
                  for k, v in s.items()} for s in (stats or [{} for _ in blocks])]
    base_stats, model_stats = (per_input[0], per_input[1:]) if job.base is not None else ({}, per_input)
    try:
        if factors is not None:
            factors = [None if f is None else tuple(x.to(device=device, dtype=compute_dtype) for x in f)
                       for f in factors]
        result = job.method.call(base, others, job.kwargs, generator=generator, stats=model_stats,
                                 base_stats=base_stats, name=job.name, report=report, factors=factors)
    except MergeError as e:  # a method's complaint about this tensor's values: say which tensor
        if f"'{job.name}'" in str(e):
            raise
        raise type(e)(f"'{job.name}': {e}") from None
    if check_result and not all_finite(result):
        raise MergeError(f"merging '{job.name}' produced NaN or infinite values; check the inputs and "
                         f"parameters for this tensor")
    return {out.name: tensor.to(dtype=out.out_dtype).to("cpu")
            for out, tensor in zip(job.outputs, _from_block(job, result))}


def _as_blocks(job: Job, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The blocks a method merges: a weight as (out, in), with its companion bias as a last column."""
    transposed = job.stats is not None and job.stats.transposed
    own = len(job.own_reads)
    weights = [t.T if transposed else t for t in tensors[:own]]
    if job.companion is None:
        return weights
    return [torch.cat([w, b[:, None]], dim=1) for w, b in zip(weights, tensors[own:])]


def _from_block(job: Job, block: torch.Tensor) -> list[torch.Tensor]:
    transposed = job.stats is not None and job.stats.transposed
    tensors = [block[:, :-1], block[:, -1]] if job.companion is not None else [block]
    if transposed:
        tensors[0] = tensors[0].T
    return [t.contiguous() for t in tensors]


Loaded = tuple[Job, list[torch.Tensor], list[dict[str, Any]] | None, list[Any] | None, list[Any]]


def _prefetch(plan: Plan, depth: int, stop: threading.Event, check_inputs: bool = True,
              stages: Stages | None = None) -> Iterator[Loaded]:
    """Yield each job with its loaded inputs, statistics, (a factored job) delta factors and, per output, what
    predicting its damage reads (``mergesmith.damage``; None without sidecars), reading ahead on a
    thread by at most ``depth`` jobs. With ``check_inputs``, a weight holding NaN or infinities is an error naming
    model and tensor (checked here, on the reader's thread, where it overlaps the compute). The reader's busy
    time goes to ``stages.read``."""
    stages = stages if stages is not None else Stages()

    def load(read: TensorInput) -> torch.Tensor:
        tensor = read.source.get(read.key)
        if check_inputs and not all_finite(tensor):
            raise CheckpointError(f"'{read.key}' in model '{read.source.name}' holds NaN or infinite values; "
                                  f"the checkpoint is broken (pass --allow-nonfinite to merge it anyway)")
        return tensor

    loaded: queue.Queue = queue.Queue(maxsize=depth)

    def read() -> None:
        try:
            for job in plan.jobs:
                if stop.is_set():
                    return
                started = time.perf_counter()
                stats = job.stats.load() if job.stats is not None else None
                factors = [r.source.low_rank(r.key) for r in job.inputs] if job.factored else None
                damage = [None if out.damage is None else
                          (out.damage.load(), None if out.damage.reference is None else load(out.damage.reference))
                          for out in job.outputs]
                item = (job, [load(r) for r in job.reads], stats, factors, damage)
                stages.read += time.perf_counter() - started
                loaded.put(item)
            loaded.put(None)
        except BaseException as e:  # re-raised on the consuming thread
            loaded.put(e)

    reader = threading.Thread(target=read, name="mergesmith-reader", daemon=True)
    try:  # started inside: an interrupt at any point still reaches the finally that joins it
        reader.start()
        while (item := loaded.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue
            try:
                loaded.get(timeout=0.05)
            except queue.Empty:
                pass


def execute(plan: Plan, sink: Callable[[str, torch.Tensor], None], *, device: str | torch.device = "cpu",
            compute_dtype: torch.dtype = torch.float32, seed: int = 0, prefetch: int = 1,
            allow_nonfinite: bool = False, on_tensor: Callable[[Job], None] | None = None,
            meter: Any = None) -> MergeSummary:
    """Run every job of ``plan`` in order, handing each result to ``sink(name, tensor)``. NaN or infinite
    values in an input or a result are an error unless ``allow_nonfinite``. Where the plan predicts damage
    (sidecars), the summary carries each model's (``MergeSummary.damage``); ``meter`` replaces the damage
    meter (``mergesmith.damage.MomentMeter`` gathers what tuning a linear merge needs instead)."""
    device = check_device(device)
    start = time.perf_counter()
    bytes_read = bytes_written = 0
    reports: dict[str, dict[str, Any]] = {}
    # closing: on an error or an interrupt the reader thread is stopped and joined here, not left running
    # into interpreter shutdown (where a live thread reading a tensor aborts the process)
    meter = damage_meter(plan) if meter is None else meter
    stages = Stages()
    jobs = contextlib.closing(_prefetch(plan, prefetch, threading.Event(), check_inputs=not allow_nonfinite,
                                        stages=stages))
    with jobs as loaded:
        clock = time.perf_counter()
        for job, tensors, stats, factors, damage in loaded:
            clock = _lap(stages, "waiting_for_reads", clock)
            bytes_read += sum(t.numel() * t.element_size() for t in tensors)
            report: dict[str, Any] = {}
            results = run_job(job, tensors, device=device, compute_dtype=compute_dtype, seed=seed, stats=stats,
                              report=report, check_result=not allow_nonfinite, factors=factors)
            if report:
                reports[job.name] = report
            clock = _lap(stages, "compute", clock)
            if meter is not None:
                _predict_damage(meter, job, tensors, results, damage)
                clock = _lap(stages, "damage", clock)
            for name, result in results.items():
                bytes_written += result.numel() * result.element_size()
                sink(name, result)
            if on_tensor is not None:
                on_tensor(job)
            clock = _lap(stages, "waiting_for_writer", clock)
    return MergeSummary(plan.method.name, [s.name for s in plan.sources], sum(len(j.outputs) for j in plan.jobs),
                        bytes_read, bytes_written, time.perf_counter() - start, peak_rss_bytes(), solver=reports,
                        fallback=list(plan.fallback), damage=meter.report() if meter is not None else [],
                        stages=stages)


def _lap(stages: Stages, stage: str, since: float) -> float:
    """Add the seconds since ``since`` to ``stage``; returns now."""
    now = time.perf_counter()
    setattr(stages, stage, getattr(stages, stage) + now - since)
    return now


def damage_meter(plan: Plan) -> DamageMeter | None:
    """A meter for every model some job predicts damage for, or None when no input has a sidecar."""
    planned = [out.damage for job in plan.jobs for out in job.outputs if out.damage is not None]
    if not planned:
        return None
    models = list(dict.fromkeys(m for p in planned for m in p.models))
    with_base = all(p.reference is not None or out.base is not None
                    for job in plan.jobs for out in job.outputs if (p := out.damage) is not None)
    return DamageMeter(models, with_base)


def _predict_damage(meter: DamageMeter, job: Job, tensors: list[torch.Tensor], results: dict[str, torch.Tensor],
                    damage: list[Any]) -> None:
    start = 0
    for out, loaded in zip(job.outputs, damage):
        own = tensors[start:start + len(out.own_reads)]
        start += len(out.own_reads)
        if loaded is None or out.name not in results:
            continue
        stats, reference = loaded
        base, inputs = (own[0], own[1:]) if out.base is not None else (reference, own)
        meter.add(out.name, results[out.name], base, inputs, out.damage, stats)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: VmHWM on Linux (getrusage's ru_maxrss can carry a
    parent's peak into a child started by vfork), else ru_maxrss."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
