"""The executor's model shards against transformers, on the CPU with tiny random checkpoints.

Every check compares with Hugging Face's own model in float32: logits within 1e-5 and greedy
tokens equal, token for token, to ``generate(do_sample=False)``. ``hf_reference`` asserts a
clear top-2 logit margin at every generated step, so an equality failure is a real bug, not a
near tie flipped by rounding. Multi-process tests (TP over gloo) spawn workers that import
this module; transformers is imported lazily so they only pay for torch.
"""
from __future__ import annotations

import json
import math
import queue
import shutil
import socket
import time
import traceback
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors = pytest.importorskip("safetensors")
pytest.importorskip("safetensors.torch")

from executor_util import stop_ranks  # noqa: E402

from hexplan.executor import model as model_mod  # noqa: E402
from hexplan.executor.distributed import (TPContext, broadcast_message, destroy_tp,  # noqa: E402
                                          init_tp)
from hexplan.executor.model import SeqChunk, ShardSpec, StageModel  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=256,
            max_position_embeddings=128, initializer_range=0.1)   # 0.02 gets stuck on one token
MARGIN = 1e-4    # smallest top-2 logit gap the references accept (rounding is ~1e-7)
ATOL = 1e-5


# ---- references ----------------------------------------------------------------------------

def make_checkpoint(path: Path, layers=4, kv_heads=4, seed=0, arch="llama", **overrides):
    """Save a tiny random float32 model to ``path``; return the HF model. Norm weights and
    biases are randomised too, so a mixed-up or missing one changes the output."""
    transformers = pytest.importorskip("transformers")
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    config = config_cls(**{**TINY, "num_hidden_layers": layers, "num_key_value_heads": kv_heads,
                           **overrides})
    torch.manual_seed(seed)
    hf = model_cls(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    hf.save_pretrained(path)
    hf.generation_config.eos_token_id = None        # generate exactly max_new_tokens
    hf.generation_config.pad_token_id = 0
    return hf


def hf_reference(hf, prompt: list[int], n: int):
    """HF's greedy tokens and, from one full forward pass, the logits that chose each of them."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False)
        tokens = out[0, len(prompt):].tolist()
        logits = hf(out[:, :-1]).logits[0, len(prompt) - 1:]           # [n, vocab]
    assert len(tokens) == n and logits.argmax(-1).tolist() == tokens
    top2 = logits.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    assert gap > MARGIN, f"near tie in the reference (gap {gap:.2e}); pick another seed"
    assert len(set(tokens)) > n // 4, f"degenerate reference {tokens}; pick another seed"
    return tokens, logits


def run_stages(stages, chunks, x):
    for stage in stages:
        x = stage(chunks, x)
    return x


def greedy(stages, prompt: list[int], n: int, rid="r", prefill_split=None):
    """Generate ``n`` tokens through a chain of stages (callables like ``forward_batch``);
    returns the tokens and the logits that chose them. ``prefill_split`` prefills in two chunks."""
    ids = torch.tensor(prompt)
    cuts = [0, prefill_split, len(prompt)] if prefill_split else [0, len(prompt)]
    for start, end in zip(cuts, cuts[1:]):
        out = run_stages(stages, [SeqChunk(rid, start, end - start)], ids[start:end])
    logits = [out[0]]
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < n:
        pos = len(prompt) + len(tokens) - 1
        logits.append(run_stages(stages, [SeqChunk(rid, pos, 1)], torch.tensor(tokens[-1:]))[0])
        tokens.append(int(logits[-1].argmax()))
    return tokens, torch.stack(logits)


def load_stages(path, cuts, ctx=None):
    """Stages over layer ranges ``cuts`` = [0, a, b, ..., L]; their forward_batch methods."""
    ctx = ctx or TPContext()
    n = len(cuts) - 1
    return [StageModel.load(path, ShardSpec(cuts[i], cuts[i + 1], i == 0, i == n - 1), ctx)
            for i in range(n)]


def check_against_hf(hf, stages, prompt, n=20, prefill_split=None):
    tokens, logits = greedy([s.forward_batch for s in stages], prompt, n,
                            prefill_split=prefill_split)
    ref_tokens, ref_logits = hf_reference(hf, prompt, n)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


PROMPT = [3, 17, 200, 45, 9, 128, 77, 1, 64, 250, 31]


# ---- (a) one stage, (c) GQA/MQA, (b) pipeline ---------------------------------------------

# seeds: the first whose greedy reference has clear margins and does not get stuck on a token
@pytest.mark.parametrize("kv_heads,seed,extra", [
    (4, 1, {}),                                           # MHA
    (2, 1, {"rope_theta": 500000.0}),                     # GQA, Llama-3 style rope base
    (1, 9, {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),   # MQA
], ids=["mha", "gqa", "mqa-tied-bias"])
def test_single_stage_matches_hf(tmp_path, kv_heads, seed, extra):
    hf = make_checkpoint(tmp_path, layers=4, kv_heads=kv_heads, seed=seed, **extra)
    (stage,) = load_stages(tmp_path, [0, 4])
    check_against_hf(hf, [stage], PROMPT, prefill_split=4)  # chunked prefill: [0, 4), [4, 11)
    assert stage.num_sequences() == 1 and stage.release("r") and stage.kv_bytes() == 0


def test_pipeline_of_three_uneven_stages_matches_hf(tmp_path):
    hf = make_checkpoint(tmp_path, layers=6, kv_heads=2, seed=1)
    stages = load_stages(tmp_path, [0, 1, 4, 6])
    assert [len(s.layers) for s in stages] == [1, 3, 2]
    assert stages[0].embed_tokens is not None and stages[0].lm_head is None
    assert stages[1].embed_tokens is None and stages[1].lm_head is None
    check_against_hf(hf, stages, PROMPT)


def test_qwen2_biases_match_hf(tmp_path):
    hf = make_checkpoint(tmp_path, layers=2, kv_heads=2, seed=3, arch="qwen2")
    (stage,) = load_stages(tmp_path, [0, 2])
    assert stage.layers[0].self_attn.q_proj.bias is not None
    assert stage.layers[0].self_attn.o_proj.bias is None
    check_against_hf(hf, [stage], PROMPT, n=8)


def test_mistral_sliding_window_matches_hf(tmp_path):
    hf = make_checkpoint(tmp_path, layers=2, kv_heads=2, seed=4, arch="mistral", sliding_window=4)
    check_against_hf(hf, load_stages(tmp_path, [0, 1, 2]), PROMPT, n=8, prefill_split=6)


# ---- (d) ragged batches --------------------------------------------------------------------

def split_in_two(stage):
    """``stage``'s forward_batch with each step cut into two parts (interleaving)."""
    from hexplan.executor.worker import split_parts

    def run(chunks, x):
        return stage.forward_batch(chunks, x, split_parts([c.length for c in chunks], 2), pieces=3)
    run.__self__ = stage
    return run


@pytest.mark.parametrize("parts", [1, 2])
def test_ragged_batches_match_per_sequence_results(tmp_path, parts):
    hf = make_checkpoint(tmp_path, layers=4, kv_heads=2, seed=5)
    loaded = load_stages(tmp_path, [0, 3, 4])
    stages = [s.forward_batch for s in loaded] if parts == 1 else [split_in_two(s) for s in loaded]
    run_ragged(hf, stages)
    first, last = loaded

    assert first.num_sequences() == 4 and first.kv_bytes() > 0
    for rid in RAGGED_PROMPTS:
        assert first.release(rid) and last.release(rid)
    assert not first.release("a")
    assert first.kv_bytes() == last.kv_bytes() == 0 and first.num_sequences() == 0


RAGGED_PROMPTS = {"a": [5, 6, 7, 8, 9], "b": PROMPT[:9], "c": [100, 2, 42], "d": [11, 22, 33, 44, 55, 66]}


def run_ragged(hf, stages):
    """Four sequences through ``stages`` in ragged steps (prefills of different lengths, a
    prompt split across steps among decodes), each checked against HF run alone."""
    prompts = RAGGED_PROMPTS
    steps = 8
    got = {rid: ([], []) for rid in prompts}              # tokens, logits
    fed = {rid: 0 for rid in prompts}                     # positions in the KV cache

    def step(plan):
        """plan: {rid: number of new positions}; prompt positions first, then the last token."""
        chunks, ids = [], []
        for rid, n in plan.items():
            seq = prompts[rid] + got[rid][0]
            chunks.append(SeqChunk(rid, fed[rid], n))
            ids += seq[fed[rid]:fed[rid] + n]
            fed[rid] += n
        logits = run_stages(stages, chunks, torch.tensor(ids))
        for (rid, _), row in zip(plan.items(), logits):
            if fed[rid] >= len(prompts[rid]):             # a token to keep, not a partial prefill
                got[rid][0].append(int(row.argmax()))
                got[rid][1].append(row)

    step({rid: len(prompts[rid]) for rid in "abc"})      # three prefills of different lengths
    step({"a": 1, "b": 1, "c": 1, "d": 4})                # d joins with half its prompt...
    step({"a": 1, "d": 2, "b": 1, "c": 1})                # ...and finishes it among decodes
    while running := {rid: 1 for rid in "abcd" if len(got[rid][0]) < steps}:
        step(running)                                     # decodes; a, b, c finish first

    for rid, prompt in prompts.items():
        ref_tokens, ref_logits = hf_reference(hf, prompt, steps)
        assert got[rid][0] == ref_tokens, rid
        torch.testing.assert_close(torch.stack(got[rid][1]), ref_logits, atol=ATOL, rtol=0)


def test_forward_batch_rejects_bad_chunks(tmp_path):
    make_checkpoint(tmp_path, layers=2, seed=6)
    first, last = load_stages(tmp_path, [0, 1, 2])
    first.forward_batch([SeqChunk("x", 0, 3)], torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="'x'.*starts at position 2.*holds 3"):
        first.forward_batch([SeqChunk("x", 2, 1)], torch.tensor([4]))
    with pytest.raises(ValueError, match="'y'.*starts at position 1.*holds 0"):
        first.forward_batch([SeqChunk("y", 1, 1)], torch.tensor([4]))
    with pytest.raises(ValueError, match="twice"):
        first.forward_batch([SeqChunk("z", 0, 1), SeqChunk("z", 1, 1)], torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="token ids"):
        first.forward_batch([SeqChunk("z", 0, 2)], torch.tensor([4]))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        first.forward_batch([SeqChunk("z", 0, 1)], torch.tensor([256]))
    with pytest.raises(ValueError, match="hidden states"):
        last.forward_batch([SeqChunk("z", 0, 2)], torch.zeros(2, 3))
    assert first.num_sequences() == 1                     # failed batches left no caches behind


# ---- (g) loading reads only this shard's tensors and slices --------------------------------

class SpyOpen:
    """Stands in for safetensors.safe_open and records files opened and slices read."""

    def __init__(self):
        self.files, self.reads = [], []                   # reads: (name, elements read, of total)

    def __call__(self, path, framework, device="cpu"):
        self.files.append(Path(path).name)
        return SpyFile(self, safetensors.safe_open(path, framework=framework, device=device))


class SpyFile:
    def __init__(self, spy, real):
        self.spy, self.real = spy, real

    def __enter__(self):
        self.f = self.real.__enter__()
        return self

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_slice(self, name):
        return SpySlice(self.spy, name, self.f.get_slice(name))

    def get_tensor(self, name):
        raise AssertionError(f"whole-tensor read of {name}")


class SpySlice:
    def __init__(self, spy, name, src):
        self.spy, self.name, self.src = spy, name, src

    def get_shape(self):
        return self.src.get_shape()

    def __getitem__(self, index):
        t = self.src[index]
        self.spy.reads.append((self.name, t.numel(), math.prod(self.src.get_shape())))
        return t


@pytest.fixture
def spy(monkeypatch):
    spy = SpyOpen()
    monkeypatch.setattr(model_mod, "safe_open", spy)
    return spy


def test_shard_reads_only_its_tensors_and_tp_slice(tmp_path, spy):
    hf = make_checkpoint(tmp_path, layers=6, kv_heads=2, seed=7)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    ckpt = tmp_path / "sharded"
    weight_map = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weight_map.values())) > 3

    # rank 1 of a TP-2 middle stage over layers [2, 4): no collectives are needed to load
    stage = StageModel.load(ckpt, ShardSpec(2, 4, False, False), TPContext(rank=1, size=2))
    wanted = {n for n in weight_map if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert {name for name, _, _ in spy.reads} == wanted
    assert sorted(spy.files) == sorted({weight_map[n] for n in wanted})
    for name, read, full in spy.reads:                    # every matrix read is half of it
        assert read == (full if name.endswith("norm.weight") else full // 2), name

    ref = hf.state_dict()
    got = stage.state_dict()
    torch.testing.assert_close(got["layers.0.self_attn.q_proj.weight"],
                               ref["model.layers.2.self_attn.q_proj.weight"][32:], atol=0, rtol=0)
    torch.testing.assert_close(got["layers.1.self_attn.k_proj.weight"],     # KV head 1 of 2
                               ref["model.layers.3.self_attn.k_proj.weight"][16:], atol=0, rtol=0)
    torch.testing.assert_close(got["layers.1.mlp.down_proj.weight"],
                               ref["model.layers.3.mlp.down_proj.weight"][:, 64:], atol=0, rtol=0)
    assert not any(k.startswith(("embed", "lm_head", "norm")) for k in got)


def test_replicated_kv_and_padded_vocab_slices(tmp_path):
    hf = make_checkpoint(tmp_path, layers=1, kv_heads=1, seed=8, vocab_size=255,
                         tie_word_embeddings=True)
    ref = hf.state_dict()
    for rank in range(4):                                 # TP 4 over 1 KV head: replicate it
        s = StageModel.load(tmp_path, ShardSpec(0, 1, True, True), TPContext(rank, 4))
        sd = s.state_dict()
        assert torch.equal(sd["layers.0.self_attn.k_proj.weight"],
                           ref["model.layers.0.self_attn.k_proj.weight"])
        head = sd["lm_head.weight"]                       # 64 rows each; rank 3 pads one
        assert head.shape == (64, 64)
        rows = ref["model.embed_tokens.weight"][64 * rank:64 * (rank + 1)]
        assert torch.equal(head[:len(rows)], rows) and not head[len(rows):].any()


def test_missing_or_misshapen_tensors_name_tensor_and_file(tmp_path):
    from safetensors.torch import load_file, save_file
    make_checkpoint(tmp_path / "ok", layers=2, seed=9)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "ok", bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.safetensors: missing tensor model\.layers\.1\.mlp\.up_proj"):
        StageModel.load(bad, ShardSpec(1, 2, False, True), TPContext())
    StageModel.load(bad, ShardSpec(0, 1, True, False), TPContext())   # layer 0 is intact

    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj"
                                         r"\.weight has shape .*config\.json implies"):
        StageModel.load(bad, ShardSpec(0, 1, True, False), TPContext())
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "llama3"}}))
    with pytest.raises(ValueError, match="rope"):
        StageModel.load(bad, ShardSpec(0, 1, True, False), TPContext())


@pytest.mark.parametrize("arch, extra", [
    ("llama", {"rope_theta": 500000.0, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("qwen2", {"rms_norm_eps": 1e-5}),
    ("mistral", {"sliding_window": 4}),
], ids=["llama", "qwen2", "mistral"])
def test_forward_constants_come_from_the_planners_reading_of_config_json(tmp_path, arch, extra):
    # hexplan.models reads and parses config.json; the stage model's constants are built from
    # that (as transformers >= 5 writes it: rope_theta inside rope_parameters), never re-read.
    from hexplan.models import load_model, read_hf_config
    make_checkpoint(tmp_path, layers=2, kv_heads=2, seed=3, arch=arch, **extra)
    spec, args = load_model(str(tmp_path)), model_mod.ModelArgs.from_hf_config(read_hf_config(tmp_path))
    assert (args.model_type, args.vocab_size, args.hidden_size, args.intermediate_size, args.num_layers,
            args.num_heads, args.num_kv_heads, args.head_dim, args.rms_norm_eps, args.rope_theta,
            args.tie_word_embeddings) == \
        (spec.model_type, spec.vocab_size, spec.hidden_size, spec.intermediate_size, spec.num_layers,
         spec.num_heads, spec.num_kv_heads, spec.dim_head, spec.rms_norm_eps, spec.rope_theta,
         spec.tie_word_embeddings)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())     # what transformers wrote
    assert args.rms_norm_eps == hf_cfg["rms_norm_eps"]
    written = (hf_cfg.get("rope_parameters") or {}).get("rope_theta", hf_cfg.get("rope_theta"))  # 5.x / 4.x
    assert written is not None and args.rope_theta == extra.get("rope_theta", written)
    assert (args.qkv_bias, args.o_bias, args.mlp_bias) == {"llama": (True, True, True), "qwen2": (True, False, False),
                                                           "mistral": (False, False, False)}[arch]
    assert args.sliding_window == (4 if arch == "mistral" else None)


def test_bad_config_json_names_the_file(tmp_path):
    from hexplan.errors import SpecError
    make_checkpoint(tmp_path, layers=2, seed=9)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text('{"hidden_size": 64,\n  oops}')
    with pytest.raises(SpecError, match=r"config\.json:2: not valid JSON"):
        StageModel.load(tmp_path, ShardSpec(0, 1, True, False), TPContext())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 0}))
    with pytest.raises(ValueError, match="config.json: num_attention_heads: must be a positive integer, got 0"):
        StageModel.load(tmp_path, ShardSpec(0, 1, True, False), TPContext())
    (tmp_path / "config.json").unlink()
    with pytest.raises(SpecError, match=r"config\.json: file not found"):
        StageModel.load(tmp_path, ShardSpec(0, 1, True, False), TPContext())


def test_missing_tensor_in_sharded_index(tmp_path):
    hf = make_checkpoint(tmp_path, layers=2, seed=9)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"index\.json: missing tensor model\.norm\.weight"):
        StageModel.load(tmp_path / "sharded", ShardSpec(1, 2, False, True), TPContext())


# ---- (e, f) multi-process: TP over gloo ------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_worker(rank, size, port, ckpt, shard, inbox, outbox, parts=1, pieces=1):
    """One TP rank of a stage: rank 0 takes batches from ``inbox``, broadcasts them to its
    followers (as a stage worker would), and every rank runs them; rank 0 returns the output.
    ``parts`` > 1 or ``pieces`` > 1: interleaved, as the stage worker runs with --interleave."""
    from hexplan.executor.worker import split_parts

    torch.set_num_threads(1)                              # two ranks share a 2-core machine
    try:
        ctx = init_tp(rank, size, "127.0.0.1", port, timeout_s=30)
        model = StageModel.load(ckpt, ShardSpec(*shard), ctx)
        while True:
            msg, tensors = broadcast_message(ctx, *(inbox.get() if rank == 0 else (None, None)))
            if msg["op"] == "stop":
                break
            chunks = [SeqChunk(*c) for c in msg["chunks"]]
            out = model.forward_batch(chunks, tensors[0], split_parts([c.length for c in chunks], parts), pieces)
            if rank == 0:
                outbox.put(out.clone())
        destroy_tp(ctx)
    except BaseException:
        outbox.put(traceback.format_exc())
        raise


class RemoteStage:
    """A TP stage in ``size`` spawned processes, called like ``forward_batch``."""

    def __init__(self, mp, size, ckpt, shard, parts=1, pieces=1):
        self.inbox, self.outbox = mp.Queue(), mp.Queue()
        port = free_port()
        self.procs = [mp.Process(target=stage_worker, daemon=True,
                                 args=(r, size, port, str(ckpt), shard, self.inbox, self.outbox, parts, pieces))
                      for r in range(size)]
        for p in self.procs:
            p.start()

    def __call__(self, chunks, x):
        self.inbox.put(({"op": "run", "chunks": [[c.request_id, c.start, c.length] for c in chunks]},
                        [x]))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                out = self.outbox.get(timeout=0.2)
            except queue.Empty:
                dead = [p.exitcode for p in self.procs if p.exitcode not in (None, 0)]
                assert not dead, f"a TP worker died (exit codes {dead})"
                continue
            assert isinstance(out, torch.Tensor), f"TP worker failed:\n{out}"
            return out
        raise TimeoutError("TP stage did not answer within 60 s")

    def close(self):
        stop_ranks(self.inbox, self.procs, "TP workers")


@pytest.fixture
def spawn():
    mp = torch.multiprocessing.get_context("spawn")
    stages = []

    def start(size, ckpt, shard, parts=1, pieces=1):
        stages.append(RemoteStage(mp, size, ckpt, shard, parts, pieces))
        return stages[-1]
    yield start
    for s in stages:
        s.close()


def test_tp2_stage_matches_hf(tmp_path, spawn):
    # KV heads split over the ranks; vocab 255 pads the LM-head shards; biases on o_proj
    # are added after the all-reduce; the head is the tied embedding.
    hf = make_checkpoint(tmp_path, layers=3, kv_heads=2, seed=10, vocab_size=255,
                         tie_word_embeddings=True, attention_bias=True)
    stage = spawn(2, tmp_path, (0, 3, True, True))
    tokens, logits = greedy([stage], PROMPT, 20)
    ref_tokens, ref_logits = hf_reference(hf, PROMPT, 20)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_tp2_stage_then_tp1_stage_matches_hf(tmp_path, spawn):
    # asymmetric pipeline: a TP-2 stage with its single KV head replicated, then a TP-1 stage
    hf = make_checkpoint(tmp_path, layers=4, kv_heads=1, seed=11)
    first = spawn(2, tmp_path, (0, 3, True, False))
    last = StageModel.load(tmp_path, ShardSpec(3, 4, False, True), TPContext()).forward_batch
    tokens, logits = greedy([first, last], PROMPT, 20)
    ref_tokens, ref_logits = hf_reference(hf, PROMPT, 20)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)


def test_interleaved_tp2_stage_matches_hf(tmp_path, spawn):
    # Steps cut into two parts whose all-reduces run asynchronously under each other's compute,
    # and each row-parallel product cut into 3 slices (Liger-style): the same tokens and logits.
    hf = make_checkpoint(tmp_path, layers=4, kv_heads=2, seed=5)
    first = spawn(2, tmp_path, (0, 3, True, False), parts=2, pieces=3)
    last = StageModel.load(tmp_path, ShardSpec(3, 4, False, True), TPContext()).forward_batch
    run_ragged(hf, [first, last])


def broadcast_tensors():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, generator=g),
            torch.randn(4, generator=g).to(torch.bfloat16),
            torch.tensor(7, dtype=torch.int64),           # 0-dim
            torch.tensor([True, False, True]),
            torch.empty(0, 5, dtype=torch.uint8),
            torch.randn(3, 2, generator=g).half().t(),    # not contiguous
            torch.arange(6, dtype=torch.int32).reshape(1, 2, 3)]


BROADCAST_OBJ = {"op": "run", "chunks": [["r1", 0, 5], ["ü", 7, 1]], "x": None, "f": 0.5}


def broadcast_worker(rank, port, results):
    try:
        ctx = init_tp(rank, 2, "127.0.0.1", port, timeout_s=30)
        if rank == 0:
            broadcast_message(ctx, BROADCAST_OBJ, broadcast_tensors())
            with_error = None
            try:
                broadcast_message(ctx, {"bad": object()}, [])
            except TypeError as e:
                with_error = e
            broadcast_message(ctx, {"after": 1}, None)
            results.put(("rank0", repr(with_error)))
        else:
            obj, tensors = broadcast_message(ctx, None, None)
            try:
                broadcast_message(ctx, None, None)
                error = None
            except ValueError as e:
                error = str(e)
            after = broadcast_message(ctx, None, None)
            # Tensors go back as safetensors bytes: a tensor put on a torch queue is shared
            # by file descriptor, which is gone if this process exits before the parent reads.
            packed = safetensors.torch.save({f"t{i}": t.contiguous() for i, t in enumerate(tensors)})
            results.put(("rank1", obj, packed, error, after))
        destroy_tp(ctx)
    except BaseException:
        results.put(("error", traceback.format_exc()))
        raise


def test_broadcast_message_round_trip():
    mp = torch.multiprocessing.get_context("spawn")
    results = mp.Queue()
    port = free_port()
    procs = [mp.Process(target=broadcast_worker, args=(r, port, results), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict((r[0], r[1:]) for r in (results.get(timeout=60) for _ in procs))
        assert "error" not in got, got["error"][0]
        assert "TypeError" in got["rank0"][0]
        obj, packed, error, after = got["rank1"]
        loaded = safetensors.torch.load(packed)
        tensors = [loaded[f"t{i}"] for i in range(len(loaded))]
        assert obj == BROADCAST_OBJ
        assert "rank 0 failed" in error
        assert after == ({"after": 1}, [])
        expected = broadcast_tensors()
        assert [t.dtype for t in tensors] == [t.dtype for t in expected]
        for t, e in zip(tensors, expected):
            assert t.shape == e.shape and torch.equal(t, e)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    # gloo can abort (SIGABRT, -6) a rank whose peer tore the group down first, after the work
    # is done and checked (as in RemoteStage.close); any other exit code is a failure.
    assert all(p.exitcode in (0, -6) for p in procs), [p.exitcode for p in procs]


def test_tp_context_single_rank_is_identity():
    ctx = TPContext()
    t = torch.arange(4.0)
    assert ctx.all_reduce_(t) is t and ctx.all_gather_last_dim(t) is t
    obj, tensors = broadcast_message(ctx, {"a": 1}, [t])
    assert obj == {"a": 1} and tensors[0] is t
    with pytest.raises(ValueError):
        TPContext(rank=2, size=2)
