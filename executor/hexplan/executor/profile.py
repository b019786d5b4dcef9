"""Per-layer times of a checkpoint on this machine: what ``hexplan profile`` measures.

Scope: a checkpoint directory in, tables out: milliseconds per layer at TP 1 against decode batch
size and against prompt tokens, the LM head's milliseconds per step against logits rows, and at
TP > 1 one all-reduce's milliseconds against rows of hidden state (the ``profiles`` a cluster
file's GPU type carries; see docs/cost-model.md, "Measured profiles"). It knows nothing about
YAML or the command line.

What runs is the executor's own stage code, at the thread count a served worker gets (``threads``;
default cores / TP, what ``hexplan launch`` gives each worker of a one-stage plan):

* the layers: ``StageModel`` with layers ``[0, layers)`` loaded as a middle stage (no embedding,
  no LM head: hidden states in, hidden states out), every step run through ``forward_parts``,
  the call a stage worker makes for each step (one part, one piece: no interleaving);
* decode, batch B: one step of B sequences, one new token each at position ``context``. Their
  KV caches are real: one prompt of ``context`` tokens is prefilled through the stage as a served
  prompt is (its cache then grows as a served one does, doubling at the first decode step), and
  copied for the other sequences (computing each would cost B x context prompt tokens;
  attention costs the same whatever the values are). Each step is the same: the caches are put
  back to ``context`` positions before it;
* prefill, P tokens: one prompt of P tokens from position 0, alone in its step; its cache is
  dropped after the step (``SeqChunk.drop``), so every repetition allocates a fresh one;
* the LM head, B rows: a last stage of no layers (final norm and LM head only), a decode step of
  B sequences through ``forward_parts`` plus what the worker does with the logits before they
  leave (``to_proto(torch.cat(outs).float())``): everything a last stage adds to a step's layers.
  A prompt's step needs logits of its last token only, so its head is the 1-row figure.

Each grid point runs ``warmup`` untimed steps, then ``repeats`` timed ones (the device is
synchronised before and after each); the median step time divided by ``layers`` is the table
value (the head's: the median step). (With ``warmup`` > 0 the first and the last point also run
once before the grid starts, for the one-time costs of a process's first steps.) A few layers
are enough: every layer has the same shapes, and a few keep the run short and the memory small
(4 layers of a 70B model in bf16 are 7 GB). The step's fixed costs (rotary tables, batch
bookkeeping) are shared by those few layers, so a tiny model's figure slightly overstates the
per-layer time of a stage holding many layers.

Tensor parallelism (``tp`` > 1): one process per rank (gloo on the CPU, NCCL on ``cuda:rank``),
joined with the executor's ``init_tp`` on 127.0.0.1 and a free port, every rank running the same
steps. The device is synchronised around each all-reduce and its time taken out, so a rank's
compute time is its step time minus its all-reduce time (waiting for a slower rank counts as
all-reduce; the slower rank's own compute counts). The tables hold the slowest rank's compute
times d, the TP-1 equivalent the cost model expects: it divides a profile by d and adds its
all-reduces, so at TP d it reproduces the measured compute exactly. The all-reduce table is what
a step took beyond that compute, per all-reduce: (slowest step - slowest compute) / (2 x layers),
at rows = decode batch and prompt tokens, so the cost model's layer time at TP d adds back up to
the measured step. The measured step and all-reduce times are kept beside it (``Point``).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import queue
import signal
import socket
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from hexplan.errors import HexplanError

from .distributed import Pending, TPContext, destroy_tp, init_tp
from .model import SeqCache, SeqChunk, ShardSpec, StageModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GPU_DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
# A CPU's decode time is irregular in the batch (steps of 3 or 5-7 sequences measured slower than
# interpolated between 2, 4 and 8; docs/fidelity.md): every batch size up to 16, then 32 and 64.
CPU_DECODE_BATCHES = tuple(range(1, 17)) + (32, 64)
DEFAULT_DECODE_BATCHES = CPU_DECODE_BATCHES     # ProfileSpec's device is the CPU by default
DEFAULT_PREFILL_TOKENS = (16, 32, 64, 128, 256, 512)
DEFAULT_LAYERS = 4
RESULT_TIMEOUT_S = 900      # TP: no word from the ranks for this long means they hang


class ProfileError(HexplanError):
    """The checkpoint could not be loaded or run; the message says why."""


@dataclass(frozen=True)
class ProfileSpec:
    """What to measure. Grids are validated by the caller (the CLI): positive, and prompt
    tokens and ``context`` + 1 within the model's positions."""
    checkpoint: str
    device: str = "cpu"                 # "cpu" or "cuda" (rank r on cuda:r)
    dtype: str = "float32"
    tp: int = 1
    layers: int = DEFAULT_LAYERS        # layers [0, layers) are loaded
    context: int = 256                  # KV positions each decode sequence holds
    decode_batches: tuple[int, ...] = DEFAULT_DECODE_BATCHES
    prefill_tokens: tuple[int, ...] = DEFAULT_PREFILL_TOKENS
    warmup: int = 1
    repeats: int = 3
    threads: int | None = None          # CPU threads per rank (None: worker_threads(tp))
    lm_head: bool = True                # also time the LM head at the decode batches


def default_decode_batches(device: str) -> tuple[int, ...]:
    """The decode grid: every batch size to 16 and then 32, 64 on the CPU; powers of 2 on a GPU."""
    return GPU_DECODE_BATCHES if device.startswith("cuda") else CPU_DECODE_BATCHES


def worker_threads(tp: int = 1) -> int:
    """CPU threads of one served worker when its stage is the only one on the machine: what
    ``hexplan launch`` gives every worker, cores / workers (its ``--threads`` overrides it)."""
    return max(1, (os.cpu_count() or 1) // max(1, tp))


@dataclass(frozen=True)
class Point:
    """One grid point. ``ms``: the table value, per layer at TP 1 (the LM head's: per step at
    TP 1). ``step_ms``: median wall time of one step through all loaded layers at this TP;
    ``allreduce_ms``: the part of it spent in all-reduces (0 at TP 1); ``spread``: the slowest
    timed step over the fastest, a noise gauge (a busy machine shows 1.5 and more). All from the
    slowest rank. ``per_allreduce_ms`` (TP > 1, decode and prefill): one all-reduce as the step
    costs it, (step - the slowest rank's compute) / (2 x layers)."""
    kind: str           # "decode" (x = batch size), "prefill" (x = prompt tokens), "head" (x = rows),
                        # "call" (x = sequences: a served call's own cost, ms per call; profile_served)
    x: int
    ms: float
    step_ms: float
    allreduce_ms: float
    spread: float = 1.0
    per_allreduce_ms: float = 0.0
    context: float = 0.0    # decode through a served worker (profile_served): its steps' mean context


@dataclass(frozen=True)
class ProfileResult:
    spec: ProfileSpec
    device_name: str
    points: tuple[Point, ...]
    seconds: float = 0.0                # load + measurement, wall

    def table(self, kind: str) -> dict[int, float]:
        return {p.x: p.ms for p in self.points if p.kind == kind}

    @property
    def decode_ms(self) -> dict[int, float]:
        return self.table("decode")

    @property
    def prefill_ms(self) -> dict[int, float]:
        return self.table("prefill")

    @property
    def lm_head_ms(self) -> dict[int, float]:
        return self.table("head")

    @property
    def call_ms(self) -> dict[int, float]:
        """A served call's own cost against sequences (``--served``; profile_served)."""
        return self.table("call")

    @property
    def allreduce_ms(self) -> dict[int, float]:
        """One all-reduce against rows of hidden state, at TP ``spec.tp`` (empty at TP 1): the
        decode points' (rows = batch), then the prefill points' at rows no decode point has."""
        if self.spec.tp <= 1:
            return {}
        out = {p.x: p.per_allreduce_ms for p in self.points if p.kind == "decode"}
        for p in self.points:
            if p.kind == "prefill" and p.x not in out:
                out[p.x] = p.per_allreduce_ms
        return dict(sorted(out.items()))


# ---- timing --------------------------------------------------------------------------------

class _Clock:
    """Seconds spent in all-reduces since the last ``reset``; ``sync`` waits for the device."""

    def __init__(self, device: str):
        cuda = device.startswith("cuda")
        self.sync: Callable[[], None] = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
        self.seconds = 0.0


@dataclass(frozen=True)
class _TimedTP(TPContext):
    """A TPContext whose all-reduces run synchronously and are timed (device synchronised
    before and after each), so their time can be taken out of a step's."""
    clock: Any = None

    def all_reduce_async(self, t: torch.Tensor) -> Pending:
        if self.size == 1:
            return Pending(t)
        self.clock.sync()
        t0 = time.perf_counter()
        out = super().all_reduce_async(t).wait()
        self.clock.sync()
        self.clock.seconds += time.perf_counter() - t0
        return Pending(out)


def _time_step(run, clock: _Clock, warmup: int, repeats: int) -> tuple[float, float, float, float]:
    """(step, all-reduce, compute) seconds, the medians over ``repeats`` timed runs, and the
    slowest run over the fastest."""
    for _ in range(warmup):
        run()
    steps, comms = [], []
    for _ in range(repeats):
        clock.sync()
        clock.seconds = 0.0
        t0 = time.perf_counter()
        run()
        clock.sync()
        steps.append(time.perf_counter() - t0)
        comms.append(clock.seconds)
    compute = [s - c for s, c in zip(steps, comms)]
    return (statistics.median(steps), statistics.median(comms), statistics.median(compute),
            max(steps) / max(min(steps), 1e-12))


def _slowest(ctx: TPContext, values: tuple[float, ...]) -> tuple[float, ...]:
    """Each value's maximum over the TP group (the same on every rank)."""
    if ctx.size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
    return tuple(t.tolist())


def _load(spec: ProfileSpec, shard: ShardSpec, ctx: TPContext, device: str) -> StageModel:
    try:
        return StageModel.load(spec.checkpoint, shard, ctx, DTYPES[spec.dtype], device)
    except torch.OutOfMemoryError:
        raise
    except (ValueError, OSError) as e:
        raise ProfileError(f"{spec.checkpoint}: {e}") from None
    except Exception as e:   # safetensors' own errors: a truncated or corrupt file
        raise ProfileError(f"{spec.checkpoint}: cannot read the weights: {type(e).__name__}: {e}") from None


def measure(spec: ProfileSpec, ctx: TPContext, device: str, progress=None) -> tuple[Point, ...]:
    """Load the stage on ``device`` as this rank of ``ctx`` and time the grid (every rank of the
    group must call this with the same spec). ``progress(point, done, total)`` after each point."""
    from .wire import to_proto   # what a last stage's worker does with the logits

    clock = _Clock(device)
    tctx = _TimedTP(ctx.rank, ctx.size, ctx.group, ctx.device, ctx.link, clock)
    dtype = DTYPES[spec.dtype]
    model = _load(spec, ShardSpec(0, spec.layers, False, False), tctx, device)
    a, H = model.args, model.args.hidden_size
    n_all = a.num_layers
    batches = tuple(spec.decode_batches)
    head = _load(spec, ShardSpec(n_all, n_all, False, True), tctx, device) if spec.lm_head and batches else None
    gen = torch.Generator(device="cpu").manual_seed(ctx.rank)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device, dtype)   # noqa: E731
    ids = [f"decode-{i}" for i in range(max(batches, default=0))]

    # Decode: real KV caches of `context` positions for the largest batch, reused by every
    # point: one prompt prefilled through the stage, its cache copied for the other sequences.
    if ids:
        model.forward_parts([SeqChunk(ids[0], 0, spec.context)], rand(spec.context, H))
        src = model.caches[ids[0]]
        for r in ids[1:]:
            cache = SeqCache(spec.layers, model.tp.kv_heads, a.head_dim, dtype, device)
            cache.k, cache.v, cache.length = src.k.clone(), src.v.clone(), src.length
            model.caches[r] = cache
    if head is not None:    # the last stage of no layers holds (empty) caches of the same sequences
        for r in ids:
            cache = SeqCache(0, head.tp.kv_heads, a.head_dim, dtype, device)
            cache.reserve(spec.context + 1)
            cache.length = spec.context
            head.caches[r] = cache

    def decode(batch: int):
        seqs = ids[:batch]
        chunks = [SeqChunk(r, spec.context, 1) for r in seqs]
        x = rand(batch, H)                                         # x: [B, H]

        def run():
            for r in seqs:                                         # the same step every time
                model.caches[r].length = spec.context
            model.forward_parts(chunks, x)                         # as the worker calls it
        return run

    def prefill(tokens: int):
        chunks = [SeqChunk("prefill", 0, tokens, drop=True)]
        x = rand(tokens, H)                                        # x: [P, H]
        return lambda: model.forward_parts(chunks, x)

    def lm_head(batch: int):
        seqs = ids[:batch]
        chunks = [SeqChunk(r, spec.context, 1) for r in seqs]
        x = rand(batch, H)

        def run():
            for r in seqs:
                head.caches[r].length = spec.context
            outs = head.forward_parts(chunks, x)                   # final norm, LM head, gather
            if ctx.rank == 0:
                to_proto(torch.cat(outs).float())                  # the logits the worker sends back
        return run

    grid = [("decode", b, decode) for b in batches] + \
           [("prefill", p, prefill) for p in spec.prefill_tokens] + \
           ([("head", b, lm_head) for b in batches] if head is not None else [])
    if spec.warmup and grid:   # once for the whole grid: lazy initialisation (thread pools, kernels, allocator)
        for kind, x, make in (grid[0], grid[-1]):
            make(x)()
    points = []
    for done, (kind, x, make) in enumerate(grid, 1):
        step, comm, compute, spread = _slowest(ctx, _time_step(make(x), clock, spec.warmup, spec.repeats))
        if kind == "head":
            point = Point(kind, x, max(compute, 1e-9) * ctx.size * 1e3, step * 1e3, comm * 1e3, spread)
        else:
            per_layer_tp1 = max(compute, 1e-9) * ctx.size / spec.layers
            each = max(step - compute, 0.0) / (2 * spec.layers) if ctx.size > 1 else 0.0
            point = Point(kind, x, per_layer_tp1 * 1e3, step * 1e3, comm * 1e3, spread, each * 1e3)
        points.append(point)
        if progress is not None:
            progress(point, done, len(grid))
    model.caches.clear()
    if head is not None:
        head.caches.clear()
    return tuple(points)


# ---- running it: in this process (TP 1) or in one process per rank ----------------------------

def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def profile_checkpoint(spec: ProfileSpec, progress=None) -> ProfileResult:
    """Measure ``spec``; ``progress(point, done, total)`` after each grid point. TP 1 runs in this
    process; TP d > 1 in d spawned processes, all stopped before this returns or raises."""
    t0 = time.perf_counter()
    if spec.tp == 1:
        device = "cuda:0" if spec.device == "cuda" else "cpu"
        threads = torch.get_num_threads()
        try:
            if spec.device == "cuda":
                torch.cuda.set_device(0)
            else:
                torch.set_num_threads(spec.threads or worker_threads(1))
            points = measure(spec, TPContext(), device, progress)
            name = device_name(device)
        finally:
            torch.set_num_threads(threads)
    else:
        points, name = _run_ranks(spec, progress)
    return ProfileResult(spec, name, points, time.perf_counter() - t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(spec: ProfileSpec, progress) -> tuple[tuple[Point, ...], str]:
    ctx = mp.get_context("spawn")
    inbox = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(spec, r, port, inbox), daemon=True,
                         name=f"hexplan-profile-r{r}") for r in range(spec.tp)]
    result = None
    try:
        for p in procs:
            p.start()
        last = time.monotonic()
        while result is None:
            try:
                msg = inbox.get(timeout=0.5)
            except queue.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode is not None]
                if dead:
                    r, code = dead[0]
                    raise ProfileError(f"TP rank {r} exited (code {code}) before reporting") from None
                if time.monotonic() - last > RESULT_TIMEOUT_S:
                    raise ProfileError(f"no word from the TP ranks for {RESULT_TIMEOUT_S} s")
                continue
            last = time.monotonic()
            if msg[0] == "progress" and progress is not None:
                progress(*msg[1:])
            elif msg[0] == "error":
                raise ProfileError(f"TP rank {msg[1]}: {msg[2]}")
            elif msg[0] == "result":
                result = msg[1:]
        for p in procs:
            p.join(timeout=30)
        return result
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is None:                      # never started (an earlier start failed)
                continue
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


def _loopback_interface() -> str | None:
    names = {n for _, n in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((n for n in ("lo", "lo0") if n in names), None)


def _rank_main(spec: ProfileSpec, rank: int, port: int, outbox) -> None:
    """One TP rank (multiprocessing spawn entry point); rank 0 reports progress and the result."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C: the parent stops every rank
    try:
        cuda = spec.device == "cuda"
        if cuda:
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        else:
            device = "cpu"
            torch.set_num_threads(spec.threads or worker_threads(spec.tp))
            lo = _loopback_interface()
            if lo and "GLOO_SOCKET_IFNAME" not in os.environ:   # keep gloo on the loopback
                os.environ["GLOO_SOCKET_IFNAME"] = lo
        ctx = init_tp(rank, spec.tp, "127.0.0.1", port, backend="nccl" if cuda else "gloo")
        try:
            report = (lambda *a: outbox.put(("progress", *a))) if rank == 0 else None
            points = measure(spec, ctx, device, report)
        finally:
            destroy_tp(ctx)
        if rank == 0:
            outbox.put(("result", points, device_name(device)))
    except Exception as e:   # the parent turns it into one line
        outbox.put(("error", rank, str(e) if isinstance(e, ProfileError) else f"{type(e).__name__}: {e}"))


# ---- a served stage's own decode steps, at load (the gateway's batch choice) ----------------

CALIBRATION_PREFIX = "\x00calibrate-"   # request ids no client can send (they are the gateway's own)


def calibrate_decode(model: StageModel, ctx: TPContext, batches, context: int, warmup: int = 1,
                     repeats: int = 3, gain: float | None = None, max_step_s: float = 2.0) -> dict[int, float]:
    """Wall milliseconds of one decode step of each batch size in ``batches`` through this
    loaded stage, every sequence at ``context`` cached tokens: what a served step costs, the LM
    head and the logits' wire form included on a last stage. Every rank of ``ctx`` must call it
    with the same arguments (the steps' collectives pair up); the slowest rank's time is
    returned; each size's time is the fastest of ``repeats`` steps after ``warmup`` (other work
    on the machine only ever adds time). Synthetic caches as ``measure``'s (one prompt
    prefilled, copied for the others, put back to ``context`` before each step), all freed
    before returning.

    Sizes run smallest first and stop after the first whose tokens/s is less than ``gain``
    (default hexplan.serving.setup.BATCH_GAIN) x the previous size's, confirmed by timing both
    again: larger ones would not be chosen (``choose_batch``). They also stop after a step slower
    than ``max_step_s``, and skip sizes whose caches would take more than a quarter of the
    device's free memory."""
    from hexplan.serving.setup import BATCH_GAIN

    from .wire import to_proto

    gain = BATCH_GAIN if gain is None else gain
    device, dtype = model.inv_freq.device, model.layers_dtype
    a = model.args
    per_seq = 2 * len(model.layers) * model.tp.kv_heads * a.head_dim * (context + 1) * dtype.itemsize
    budget = -_slowest(ctx, (-float(_free_bytes(device) // 4),))[0]   # the least of the ranks': one list for all
    batches = sorted({int(b) for b in batches if b > 0 and int(b) * per_seq <= budget})
    if not batches or context < 1:
        return {}
    gen = torch.Generator(device="cpu").manual_seed(0)

    def inputs(n: int) -> torch.Tensor:
        if model.shard.is_first:
            return torch.randint(a.vocab_size, (n,), generator=gen).to(device)
        return torch.randn(n, a.hidden_size, generator=gen).to(device, dtype)

    ids = [f"{CALIBRATION_PREFIX}{i}" for i in range(batches[-1])]
    sync = (lambda: torch.cuda.synchronize(device)) if str(device).startswith("cuda") else (lambda: None)
    out: dict[int, float] = {}
    try:
        model.forward_parts([SeqChunk(ids[0], 0, context)], inputs(context))
        src = model.caches[ids[0]]

        def step_ms(b: int) -> float:
            """The fastest of ``repeats`` timed steps of ``b`` sequences (after ``warmup``): a busy
            machine only ever adds time. The slowest rank's, so every rank decides alike."""
            seqs = ids[:b]
            for r in seqs:                                     # copies of the first one's, made as needed
                if r not in model.caches:
                    cache = SeqCache(len(model.layers), model.tp.kv_heads, a.head_dim, dtype, device)
                    cache.k, cache.v, cache.length = src.k.clone(), src.v.clone(), src.length
                    model.caches[r] = cache
            chunks = [SeqChunk(r, context, 1) for r in seqs]
            x = inputs(b)
            times = []
            for i in range(warmup + repeats):
                for r in seqs:
                    model.caches[r].length = context
                sync()
                t0 = time.perf_counter()
                outs = model.forward_parts(chunks, x)
                if model.shard.is_last and ctx.rank == 0:
                    to_proto(torch.cat(outs).float())
                sync()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            return _slowest(ctx, (min(times) * 1e3,))[0]

        def too_little(b: int, prev: int) -> bool:
            return b / out[b] < gain * prev / out[prev]

        prev = None
        for b in batches:
            out[b] = step_ms(b)
            if out[b] > max_step_s * 1e3:
                break
            if prev is not None and too_little(b, prev):
                # before stopping on it, time both sizes again (a burst of other work can slow
                # one size's steps and stop the timing early)
                out[prev] = min(out[prev], step_ms(prev))
                out[b] = min(out[b], step_ms(b))
                if too_little(b, prev):
                    break
            prev = b
    finally:
        for r in ids:
            model.caches.pop(r, None)
    return out


def _free_bytes(device) -> int:
    """Free memory of ``device``: the GPU's, or the host's available memory."""
    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 32
