"""Why a stage worker runs every forward on one thread (worker.ComputeThread).

    python bench/thread_team_bench.py [--checkpoint DIR] [--batch 64] [--context 160] [--steps 12]
    OMP_WAIT_POLICY=PASSIVE python bench/thread_team_bench.py ...     (libgomp never spins)

One loaded stage (all layers of the executor benchmark's 134M model, 2 torch threads), a decode
step of ``--batch`` sequences at ``--context`` cached tokens, timed in four phases in one
process: on the main thread; on a second thread (which then stays alive, idle); on the main
thread again; on the main thread after the second thread has exited. Each thread that runs
parallel torch work gets a team of OpenMP threads; with two teams on a 2-core machine libgomp
stops spinning between parallel regions and every region waits for its threads to wake.
Prints the median and least step time of each phase (docs/executor-benchmark.md, "One compute
thread per worker").
"""
from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import executor_bench as eb  # noqa: E402

from hexplan.executor.distributed import TPContext  # noqa: E402
from hexplan.executor.model import SeqChunk, ShardSpec, StageModel  # noqa: E402


class Other(threading.Thread):
    """A second thread that runs the step when asked, until told to exit."""

    def __init__(self, step):
        super().__init__(daemon=True, name="second")
        self.step, self.asks, self.answers = step, queue.Queue(), queue.Queue()
        self.start()

    def run(self):
        while self.asks.get():
            self.answers.put(self.step())

    def call(self) -> float:
        self.asks.put(True)
        return self.answers.get()

    def stop(self):
        self.asks.put(False)
        self.join()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="reuse (or create) the benchmark checkpoint in this directory")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per phase (default 12)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="hexplan-team-") as tmp:
        ckpt = eb.benchmark_checkpoint(args.checkpoint, tmp)
        cfg = json.loads((Path(ckpt) / "config.json").read_text())
        vocab = cfg["vocab_size"]
        model = StageModel.load(ckpt, ShardSpec(0, cfg["num_hidden_layers"], True, True), TPContext(0, 1))
        ids = [f"r{i}" for i in range(args.batch)]
        for r in ids:
            model.forward_batch([SeqChunk(r, 0, args.context)], torch.randint(0, vocab, (args.context,)))
        pos = dict.fromkeys(ids, args.context)

        def step() -> float:
            t = time.perf_counter()
            model.forward_batch([SeqChunk(r, pos[r], 1) for r in ids], torch.randint(0, vocab, (args.batch,)))
            for r in ids:
                pos[r] += 1
            return time.perf_counter() - t

        for _ in range(2):
            step()
        phases = {"main thread": [step() for _ in range(args.steps)]}
        other = Other(step)
        phases["second thread"] = [other.call() for _ in range(args.steps)]
        phases["main thread, second alive"] = [step() for _ in range(args.steps)]
        other.stop()
        phases["main thread, second exited"] = [step() for _ in range(args.steps)]
    print(f"decode step of {args.batch} at context {args.context}, {args.threads} torch threads, "
          f"{args.steps} steps per phase\n")
    print("| phase | median ms | least ms |\n|---|---|---|")
    for name, ts in phases.items():
        print(f"| {name} | {1e3 * statistics.median(ts):.1f} | {1e3 * min(ts):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
