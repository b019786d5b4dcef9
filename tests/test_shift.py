"""Shift Parallelism in the executor (executor/hexplan/executor/shift.py), on the CPU over gloo.

A shifted stage runs each step in TP mode (one group of d ranks) or SP mode (sp groups of tp
ranks, Ulysses all-to-alls around attention), by the step's token count against a threshold.
Small thresholds force switches inside one generation: a chunk or batch above the threshold runs
in SP mode, one at or below it in TP mode. Every generation is checked token for token (and its
logits to 1e-5) against transformers, as tests/test_executor_model.py does for plain stages.
"""
from __future__ import annotations

import queue
import time
import traceback

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from hexplan.executor.distributed import TPContext, broadcast_message, destroy_tp, init_tp  # noqa: E402
from hexplan.executor.model import SeqChunk, ShardSpec, StageModel  # noqa: E402
from hexplan.executor.shift import ShiftLayout, init_shift, shift_problem  # noqa: E402
from hexplan.serving.shift import SP_MODE, TP_MODE  # noqa: E402

from executor_util import free_port, stop_ranks  # noqa: E402
from test_executor_model import ATOL, greedy, hf_reference, make_checkpoint  # noqa: E402


# ---- geometry, without processes --------------------------------------------------------------

def test_layout_blocks_groups_and_vocab_order():
    # d = 4 = sp 2 x tp 2: rank r = s*tp + t; TP-mode block k = t*S + s
    lays = [ShiftLayout(4, 2, r) for r in range(4)]
    assert [(x.s, x.t, x.layout_rank) for x in lays] == [(0, 0, 0), (0, 1, 2), (1, 0, 1), (1, 1, 3)]
    assert lays[0].tp_group(1) == [2, 3] and lays[0].sp_group(1) == [1, 3]
    assert lays[0].vocab_order == [0, 2, 1, 3]
    for d, sp in ((2, 2), (4, 2), (4, 4), (8, 2), (8, 4), (6, 3)):
        lays = [ShiftLayout(d, sp, r) for r in range(d)]
        assert sorted(x.layout_rank for x in lays) == list(range(d))          # each block once
        # the all-gather returns the shards in process-rank order; the permutation puts the
        # shard of block k (held by the rank whose layout_rank is k) in place k
        gathered = [lay.layout_rank for lay in lays]                          # what rank r holds
        assert [gathered[r] for r in lays[0].vocab_order] == list(range(d))
        # SP group of tp index t: the ranks whose d-way blocks are tp block t's S sub-blocks, in order
        for t in range(d // sp):
            assert [lays[r].layout_rank for r in lays[0].sp_group(t)] == [t * sp + s for s in range(sp)]


def test_shift_problem_names_what_cannot_be_laid_out():
    assert shift_problem(4, 2, 128, 4, 2) is None                # KV heads replicated over 4 ranks
    assert shift_problem(8, 8, 128, 4, 1) is None                # not shifted
    assert "must divide the stage's tp 4" in shift_problem(8, 8, 128, 4, 3)
    assert "6 attention heads" in shift_problem(6, 6, 128, 4, 2)
    assert "intermediate_size 100" in shift_problem(8, 8, 100, 8, 2)
    assert "3 KV heads" in shift_problem(12, 3, 96, 4, 2)
    with pytest.raises(ValueError, match="sp >= 2"):
        ShiftLayout(4, 3, 0)


@pytest.mark.parametrize("heads,kv_heads,d,sp", [(8, 4, 4, 2), (4, 2, 4, 2), (4, 1, 2, 2), (8, 8, 8, 4)],
                         ids=["gqa-split", "gqa-replicated", "mqa-sp2", "mha-sp4x2"])
def test_weights_tp_mode_views_equal_plain_tp_shards(tmp_path, heads, kv_heads, d, sp):
    # Loading needs no collectives, so every rank of a shifted stage is built in this process.
    # Its TP-mode weights must equal a plain d-way stage's at its layout rank (and be views of
    # its SP-mode weights: no second copy); its SP-mode q/o/MLP weights a plain d/sp-way stage's
    # at its tp index.
    from hexplan.executor.shift import Shift

    make_checkpoint(tmp_path, layers=2, kv_heads=kv_heads, seed=0, num_attention_heads=heads, vocab_size=254)
    shard = ShardSpec(0, 2, True, True)
    for r in range(d):
        lay = ShiftLayout(d, sp, r)
        shift = Shift(lay, 0, TPContext(lay.t, lay.tp), TPContext(lay.s, sp))
        m = StageModel.load(tmp_path, shard, TPContext(r, d), shift=shift)
        plain = StageModel.load(tmp_path, shard, TPContext(lay.layout_rank, d))
        narrow = StageModel.load(tmp_path, shard, TPContext(lay.t, lay.tp))
        got, want, want_sp = m.state_dict(), plain.state_dict(), narrow.state_dict()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=f"rank {r}: {k}")
        for j, layer in enumerate(m.layers):
            for name in ("q_proj", "o_proj"):
                torch.testing.assert_close(getattr(layer.sp, name).weight,
                                           want_sp[f"layers.{j}.self_attn.{name}.weight"], rtol=0, atol=0)
            for name in ("gate_proj", "up_proj", "down_proj"):
                torch.testing.assert_close(getattr(layer.sp, name).weight,
                                           want_sp[f"layers.{j}.mlp.{name}.weight"], rtol=0, atol=0)
            for tp_w, sp_w in ((layer.self_attn.q_proj, layer.sp.q_proj), (layer.self_attn.k_proj, layer.sp.k_proj),
                               (layer.self_attn.o_proj, layer.sp.o_proj), (layer.mlp.down_proj, layer.sp.down_proj)):
                assert tp_w.weight.untyped_storage().data_ptr() == sp_w.weight.untyped_storage().data_ptr()


# ---- a shifted stage in spawned processes -------------------------------------------------------

def shift_worker(rank, size, sp, threshold, port, ckpt, shard, inbox, outbox):
    """One rank of a (shifted when sp > 1) stage: rank 0 takes ops from ``inbox`` and broadcasts
    them; every rank runs them. ``run`` answers from rank 0; ``info`` and ``gather`` from every rank."""
    from hexplan.executor.worker import split_parts

    torch.set_num_threads(1)                              # up to four ranks share a 2-core machine
    try:
        ctx = init_tp(rank, size, "127.0.0.1", port, timeout_s=30)
        shift = init_shift(ctx, sp, threshold) if sp > 1 else None
        model = StageModel.load(ckpt, ShardSpec(*shard), ctx, shift=shift)
        while True:
            msg, tensors = broadcast_message(ctx, *(inbox.get() if rank == 0 else (None, None)))
            op = msg["op"]
            if op == "stop":
                break
            if op == "run":
                chunks = [SeqChunk(*c) for c in msg["chunks"]]
                parts = split_parts([c.length for c in chunks], msg.get("parts", 1))
                out = model.forward_batch(chunks, tensors[0], parts, msg.get("pieces", 1))
                if rank == 0:
                    outbox.put(out.clone())
            elif op in ("offload", "release"):
                for rid in msg["ids"]:
                    getattr(model, op)(rid)
            elif op == "info":    # the cache tensors' identities and the steps run in each mode
                caches = {rid: [c.k.data_ptr(), c.v.data_ptr(), c.k.untyped_storage().data_ptr(), id(c.k), id(c.v),
                                list(c.k.shape)] for rid, c in model.caches.items()}
                outbox.put({"rank": rank, "modes": dict(model.mode_steps), "caches": caches})
            elif op == "gather":  # the LM head's gather on shards that spell the vocabulary
                t = model.tp
                shard = torch.arange(t.vocab0, t.vocab0 + t.vocab, dtype=torch.float32)[None]
                outbox.put({"rank": rank, "ordered": ctx.all_gather_last_dim(shard, model.vocab_order),
                            "plain": ctx.all_gather_last_dim(shard)})
        destroy_tp(ctx)
    except BaseException:
        outbox.put(traceback.format_exc())
        raise


class ShiftStage:
    """A stage of ``size`` ranks in spawned processes, called like ``forward_batch``."""

    def __init__(self, mp, size, sp, threshold, ckpt, shard):
        self.size, self.inbox, self.outbox = size, mp.Queue(), mp.Queue()
        port = free_port()
        self.procs = [mp.Process(target=shift_worker, daemon=True,
                                 args=(r, size, sp, threshold, port, str(ckpt), shard, self.inbox, self.outbox))
                      for r in range(size)]
        for p in self.procs:
            p.start()
        self.parts = self.pieces = 1

    def _get(self, timeout=90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                out = self.outbox.get(timeout=0.2)
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode not in (None, 0)]
                assert not dead, f"a worker died (exit codes {dead})"
                continue
            assert not isinstance(out, str), f"worker failed:\n{out}"
            return out
        raise TimeoutError(f"stage did not answer within {timeout} s")

    def __call__(self, chunks, x):
        self.inbox.put(({"op": "run", "parts": self.parts, "pieces": self.pieces,
                         "chunks": [[c.request_id, c.start, c.length] for c in chunks]}, [x]))
        return self._get()

    def every_rank(self, op, **kw) -> list:
        self.inbox.put(({"op": op, **kw}, []))
        return sorted((self._get() for _ in range(self.size)), key=lambda m: m["rank"])

    def send(self, op, **kw):
        self.inbox.put(({"op": op, **kw}, []))

    def close(self):
        stop_ranks(self.inbox, self.procs, "workers")


@pytest.fixture
def spawn():
    mp = torch.multiprocessing.get_context("spawn")
    stages = []

    def start(size, sp, threshold, ckpt, shard):
        stages.append(ShiftStage(mp, size, sp, threshold, ckpt, shard))
        return stages[-1]
    yield start
    for s in stages:
        s.close()


def modes(stage) -> dict:
    info = stage.every_rank("info")
    assert all(i["modes"] == info[0]["modes"] for i in info), "the ranks disagree on the modes"
    return info[0]["modes"]


def check_greedy(hf, stages, prompt, n, prefill_split=None):
    tokens, logits = greedy(stages, prompt, n, rid=f"g{len(prompt)}-{prefill_split}", prefill_split=prefill_split)
    ref_tokens, ref_logits = hf_reference(hf, prompt, n)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def check_ragged(hf, stages, prompts, n):
    """Prefill all prompts in one step, then decode them together; the shortest-lived ones stop
    early (n - 2i tokens for the i-th), so the batch shrinks. Each sequence equals its reference."""
    refs = [hf_reference(hf, p, n - 2 * i) for i, p in enumerate(prompts)]
    ids = [f"b{i}" for i in range(len(prompts))]
    chunks = [SeqChunk(r, 0, len(p)) for r, p in zip(ids, prompts)]
    out = None
    for st in stages:
        out = st(chunks, torch.tensor([t for p in prompts for t in p]) if out is None else out)
    got = [[int(out[i].argmax())] for i in range(len(prompts))]
    logits = [[out[i]] for i in range(len(prompts))]
    while True:
        live = [i for i in range(len(prompts)) if len(got[i]) < len(refs[i][0])]
        if not live:
            break
        chunks = [SeqChunk(ids[i], len(prompts[i]) + len(got[i]) - 1, 1) for i in live]
        out = None
        for st in stages:
            out = st(chunks, torch.tensor([got[i][-1] for i in live]) if out is None else out)
        for row, i in enumerate(live):
            got[i].append(int(out[row].argmax()))
            logits[i].append(out[row])
    for i, (ref_tokens, ref_logits) in enumerate(refs):
        assert got[i] == ref_tokens, f"sequence {i}"
        torch.testing.assert_close(torch.stack(logits[i]), ref_logits, atol=ATOL, rtol=0)


PROMPTS = [[3, 17, 200, 45, 9, 128, 77, 1, 64, 250, 31],
           [5, 99, 12],
           [7, 8, 140, 33, 210, 6, 1]]


@pytest.mark.parametrize("kv_heads,seed", [(2, 10), (1, 6)], ids=["gqa-split", "mqa-replicated"])
def test_sp2_tp1_stage_matches_hf_across_switches(tmp_path, spawn, kv_heads, seed):
    # (a) a shifted TP-2 stage: sp 2 x tp 1. Threshold 2: an 11-token prefill runs in SP mode (odd
    # count: the second rank's block is padded), decode steps in TP mode; a 2 + 9 chunked prefill
    # goes TP -> SP -> TP; a batch of three decodes (3 tokens) runs in SP mode and, as sequences
    # finish, in TP mode. Vocab 255 pads the LM-head shards; o_proj biases; tied embeddings.
    hf = make_checkpoint(tmp_path, layers=3, kv_heads=kv_heads, seed=seed, vocab_size=255,
                         tie_word_embeddings=True, attention_bias=True)
    stage = spawn(2, 2, 2, tmp_path, (0, 3, True, True))
    check_greedy(hf, [stage], PROMPTS[0], 8)
    assert modes(stage) == {SP_MODE: 1, TP_MODE: 7}
    check_greedy(hf, [stage], PROMPTS[0], 6, prefill_split=2)
    assert modes(stage) == {SP_MODE: 2, TP_MODE: 7 + 1 + 5}
    # prefill (21 tokens) SP; 2 steps of 3 decodes SP; 2 of 2 and 2 of 1 TP
    check_ragged(hf, [stage], PROMPTS, 7)
    assert modes(stage) == {SP_MODE: 2 + 1 + 2, TP_MODE: 13 + 4}


@pytest.mark.parametrize("heads,kv_heads,seed", [(8, 4, 1), (4, 2, 1)], ids=["gqa-split", "gqa-replicated"])
def test_sp2_tp2_stage_then_plain_stage_matches_hf(tmp_path, spawn, heads, kv_heads, seed):
    # (b) a TP-4 stage run as sp 2 x tp 2, then a plain TP-1 stage (the LM head's logits there);
    # GQA with the KV heads split over the 4 ranks (8 heads, 4 KV heads) or replicated (2 KV
    # heads for 4 ranks). Then the same stage interleaved: steps cut into parts and each
    # row-parallel product into pieces, in both modes.
    hf = make_checkpoint(tmp_path, layers=4, kv_heads=kv_heads, seed=seed, num_attention_heads=heads)
    first = spawn(4, 2, 5, tmp_path, (0, 3, True, False))
    last = StageModel.load(tmp_path, ShardSpec(3, 4, False, True), TPContext()).forward_batch
    check_greedy(hf, [first, last], PROMPTS[0], 6, prefill_split=4)      # TP, SP, then TP decodes
    assert modes(first) == {SP_MODE: 1, TP_MODE: 6}
    first.parts, first.pieces = 2, 2
    check_ragged(hf, [first, last], PROMPTS, 5)                          # prefill SP, 4 decode steps TP
    assert modes(first) == {SP_MODE: 2, TP_MODE: 6 + 4}


def test_last_stage_logits_permutation_and_kv_cache_identity(tmp_path, spawn):
    # A shifted sp 2 x tp 2 last stage: the vocab-parallel LM head's gather comes back in
    # process-rank order [blocks 0, 2, 1, 3]; the fixed permutation puts it in vocabulary order.
    # The KV cache tensors are the same objects and memory before and after each switch.
    hf = make_checkpoint(tmp_path, layers=2, kv_heads=2, seed=1, vocab_size=254)
    stage = spawn(4, 2, 3, tmp_path, (0, 2, True, True))
    for g in stage.every_rank("gather"):
        torch.testing.assert_close(g["ordered"], torch.arange(256, dtype=torch.float32)[None])   # 4 x 64 rows
        assert not torch.equal(g["plain"], g["ordered"])                    # the permutation is not the identity
    rid, prompt = "kv", PROMPTS[0]
    ref = hf_reference(hf, prompt, 5)[0]
    seen = []

    def cache_state():
        info = stage.every_rank("info")
        seen.append(info[0]["modes"])
        return {i["rank"]: i["caches"][rid] for i in info}
    stage([SeqChunk(rid, 0, 3)], torch.tensor(prompt[:3]))                # 3 tokens: TP mode
    first = cache_state()
    out = stage([SeqChunk(rid, 3, 8)], torch.tensor(prompt[3:]))         # 8 tokens: SP mode
    assert cache_state() == first, "the KV cache moved at the TP -> SP switch"
    tokens = [int(out[0].argmax())]
    for step in range(4):                                                 # decode steps: TP mode
        out = stage([SeqChunk(rid, len(prompt) + step, 1)], torch.tensor(tokens[-1:]))
        tokens.append(int(out[0].argmax()))
    assert cache_state() == first, "the KV cache moved at the SP -> TP switch"   # capacity 16 >= 15
    assert tokens == ref
    assert seen == [{SP_MODE: 0, TP_MODE: 1}, {SP_MODE: 1, TP_MODE: 1}, {SP_MODE: 1, TP_MODE: 5}]
    stage.send("release", ids=[rid])
    assert all(rid not in i["caches"] for i in stage.every_rank("info"))


def test_offload_and_restore_on_a_shifted_stage(tmp_path, spawn):
    # mlfq's preemption: the cache offloaded to host memory before every decode step and restored
    # by it. Threshold 0: every step in SP mode, the 1-token decodes too (the second rank's block
    # is all padding). The tokens stay transformers'.
    hf = make_checkpoint(tmp_path, layers=2, kv_heads=2, seed=1)
    stage = spawn(2, 2, 0, tmp_path, (0, 2, True, True))
    prompt, n = PROMPTS[2], 6
    ref = hf_reference(hf, prompt, n)[0]
    out = stage([SeqChunk("o", 0, len(prompt))], torch.tensor(prompt))
    tokens = [int(out[0].argmax())]
    for step in range(n - 1):
        stage.send("offload", ids=["o"])
        out = stage([SeqChunk("o", len(prompt) + step, 1)], torch.tensor(tokens[-1:]))
        tokens.append(int(out[0].argmax()))
    assert tokens == ref
    assert modes(stage) == {SP_MODE: n, TP_MODE: 0}


# ---- served: node executors, workers, gateway ------------------------------------------------

def shifted_plan(checkpoint, stages):
    """A plan of one pipeline of (node, tp, sp, start, end) stages."""
    from hexplan.plan import plan_from_dict

    used: dict = {}
    st = []
    for node, tp, sp, a, b in stages:
        first = used.get(node, 0)
        used[node] = first + tp
        st.append({"node": node, "gpus": list(range(first, first + tp)), "tp": tp, "layers": [a, b],
                   **({"shift": {"sp": sp}} if sp > 1 else {})})
    return plan_from_dict({"model": checkpoint, "pipelines": [{"weight": 1.0, "stages": st}]})


def test_launch_serves_a_shifted_stage_token_identical(tmp_path):
    # hexplan launch's path: LoadShard carries shift_sp and shift_threshold, the stage's workers
    # make the sub-groups. Threshold 2 with 3-token prefill chunks and 6 concurrent requests under
    # mlfq: steps of prompt chunks plus decodes run in SP mode, the tail of lone decodes in TP mode.
    from executor_util import hf_greedy, make_checkpoint as make_ckpt
    from hexplan.executor.client import generate
    from hexplan.executor.launch import Launch
    from concurrent import futures

    ckpt = make_ckpt(tmp_path / "m", layers=3, heads=4, kv_heads=2, seed=1)
    prompts = [[5, 17, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 100], [42] * 9, [7, 8, 9, 10], [19]]
    news = [6, 4, 8, 5, 7, 3]
    with Launch(shifted_plan(ckpt, [("a", 2, 2, 0, 2), ("b", 1, 1, 2, 3)]), ckpt, prefill_chunk=3, policy="mlfq",
                shift_threshold=2, threads=1) as L:
        with futures.ThreadPoolExecutor(len(prompts)) as pool:
            jobs = [pool.submit(generate, L.address, token_ids=p, max_new_tokens=n, timeout=180)
                    for p, n in zip(prompts, news)]
            results = [j.result() for j in jobs]
    for p, n, r in zip(prompts, news, results):
        assert r["token_ids"] == hf_greedy(ckpt, p, n), f"prompt {p}"


def test_gateway_refuses_a_shift_the_heads_cannot_take(tmp_path):
    from executor_util import make_checkpoint as make_ckpt
    from hexplan.executor.gateway import Gateway, GatewayError

    ckpt = make_ckpt(tmp_path / "m", layers=2, hidden=96, heads=12, kv_heads=3, intermediate=96)
    gw = Gateway(shifted_plan(ckpt, [("a", 4, 2, 0, 2)]), ckpt, {"a": "127.0.0.1:9"}, calibrate=False)
    with pytest.raises(GatewayError, match=r"stage 0 on a: shift sp 2 x tp 2: 3 KV heads can be neither split"):
        gw.start()


@pytest.mark.parametrize("cmd", ["serve", "launch"])
def test_cli_shift_threshold_bad_input(tmp_path, cmd):
    import subprocess
    import sys

    plan_file = tmp_path / "p.yaml"
    plan_file.write_text("model: llama-2-7b\npipelines:\n- stages:\n"
                         "  - {node: a, gpus: [0, 1], tp: 2, layers: [0, 32], shift: {sp: 2}}\n")
    args = ["--plan", str(plan_file)] if cmd == "serve" else [str(plan_file)]
    out = subprocess.run([sys.executable, "-m", "hexplan.cli", cmd, *args, "--checkpoint", str(tmp_path),
                          "--shift-threshold", "-1"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == "hexplan: error: --shift-threshold: must be a number of tokens >= 0, got -1"


def test_stage_threshold_comes_from_the_flag_the_cost_model_or_256():
    from hexplan import costmodel
    from hexplan.cluster import cluster_to_dict, loads_cluster
    from hexplan.executor.loading import stage_shift_threshold
    from hexplan.plan import plan_from_dict

    cluster = loads_cluster("name: h\nnodes:\n  - {name: n0, gpu: H100-80G, count: 8}\n")
    stage = {"node": "n0", "gpus": list(range(8)), "tp": 8, "layers": [0, 80], "shift": {"sp": 4}}

    def plan(**extra):
        return plan_from_dict({"model": "llama-3-70b", "pipelines": [{"weight": 1.0, "stages": [stage]}], **extra})
    bare, with_cluster = plan(), plan(cluster=cluster_to_dict(cluster))
    s = bare.pipelines[0].stages[0]
    node = cluster.node("n0")
    assert stage_shift_threshold(with_cluster, s) == costmodel.shift_threshold(
        with_cluster.model, node.gpu, 8, 4, node.interconnect)
    assert stage_shift_threshold(bare, s) == 256                     # no cluster section: Arctic's documented value
    assert stage_shift_threshold(with_cluster, s, 0) == 0            # --shift-threshold wins
    assert stage_shift_threshold(plan(assumptions={"cost_params": {"shift_threshold": 96}}), s) == 96
