"""The cost model and the pipeline evaluation checked against hand calculations.

Every expected number below is computed from the model shapes and the GPU datasheet figures
with plain arithmetic written out in the test (the comments carry the same arithmetic with
rounded values), never by calling the function under test. docs/cost-model.md states the
formulas; this file is their executable check.

Units: bytes, seconds, FLOPs; 1 Gbps = 1e9 / 8 = 125e6 bytes/s.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest

from hexplan.cluster import loads_cluster
from hexplan.costmodel import (DEFAULT_PARAMS, TOKEN_ID_BYTES, CostParams, Workload,
                               coordinator_out_capacity, coordinator_token_capacity,
                               decode_layer_time, hop_decode_time, hop_prefill_time,
                               link_token_capacity, lm_head_time, local_kv_heads,
                               prefill_layer_time, ring_allreduce_time, send_time, stage_cost)
from hexplan.evaluate import CostCache, evaluate_pipeline, pipeline_overheads, round_trip
from hexplan.gpus import CATALOG, ProfileTable
from hexplan.models import BUILTIN_MODELS

EXACT = 1e-9  # relative tolerance where the hand formula is the code's formula

# ---------------------------------------------------------------------------------------
# Hand-copied shapes and datasheet figures (the tests below never read them back from code
# except to check that they match these).

# Llama-2-70B: 80 layers, H 8192, I 28672, 64 query heads, 8 KV heads (GQA), vocab 32000, fp16.
H70, I70, NH70, KV70, HD70, V70, B2 = 8192, 28672, 64, 8, 128, 32000, 2
# Llama-2-7B: 32 layers, H 4096, I 11008, 32 heads, 32 KV heads (MHA), vocab 32000, fp16.
H7, I7, NH7, KV7, HD7, V7 = 4096, 11008, 32, 32, 128, 32000

# A100-40G SXM4: 40 GB, 1555 GB/s, 312 dense fp16 TFLOPS, NVLink 300 GB/s per direction.
A100_MEM, A100_BW, A100_F, A100_NVL = 40e9, 1555e9, 312e12, 300e9
# L4: 24 GB, 300 GB/s, 121 TFLOPS, PCIe 4.0 x16 32 GB/s.
L4_MEM, L4_BW, L4_F, L4_PCIE = 24e9, 300e9, 121e12, 32e9
# T4: 16 GB, 320 GB/s, 65 TFLOPS.
T4_BW, T4_F = 320e9, 65e12

ETA_MEM, ETA_F, ALPHA, HEADROOM = 0.7, 0.5, 10e-6, 0.10
P, O, BATCH, CONC = 512, 128, 16, 64          # default Workload
CTX = P + O                                    # 640 tokens of KV reserved per sequence
MEAN_CTX = P + (O + 1) / 2                     # 576.5 tokens seen by the average decode step

GBPS = 1e9 / 8

# Llama-2-70B per layer, by hand:
#   q = H * NH*HD            = 8192 * 8192       =  67,108,864
#   k, v = 2 * H * KV*HD     = 2 * 8192 * 1024   =  16,777,216
#   o = NH*HD * H            = 8192 * 8192       =  67,108,864
#   MLP gate/up/down = 3 H I = 3 * 8192 * 28672  = 704,643,072
#   two RMSNorm weights 2 H  =                         16,384
#   total                                          = 855,654,400 params = 1,711,308,800 bytes
P70 = H70 * NH70 * HD70 + 2 * H70 * KV70 * HD70 + NH70 * HD70 * H70 + 3 * H70 * I70 + 2 * H70
LB70 = P70 * B2
KV70_TOK = 2 * KV70 * HD70 * B2                # K and V, 8 heads x 128 x 2 bytes = 4096 B
# Llama-2-7B per layer: 4 H^2 + 3 H I + 2 H = 67,108,864 + 135,266,304 + 8,192 = 202,383,360
P7 = 4 * H7 * H7 + 3 * H7 * I7 + 2 * H7
LB7 = P7 * B2                                  # 404,766,720 bytes
KV7_TOK = 2 * KV7 * HD7 * B2                   # 16,384 B


def roofline(nbytes, flops, bw, f):
    return max(nbytes / (bw * ETA_MEM), flops / (f * ETA_F))


def ring(m, d, beta):
    return 0.0 if d <= 1 else 2 * (d - 1) * (ALPHA + m / (d * beta))


def m70():
    return BUILTIN_MODELS["llama-2-70b"]


def m7():
    return BUILTIN_MODELS["llama-2-7b"]


# ---------------------------------------------------------------------------------------
# Inputs: defaults, datasheet figures, model shapes

def test_defaults():
    w = Workload()
    assert (w.prompt_tokens, w.output_tokens, w.batch_size, w.concurrency) == (512, 128, 16, 64)
    assert w.context == 640                      # 512 + 128
    assert w.mean_decode_context == 576.5        # 512 + (128 + 1) / 2
    p = CostParams()
    assert p == DEFAULT_PARAMS
    assert (p.mem_efficiency, p.flops_efficiency, p.allreduce_alpha, p.memory_headroom) == (0.7, 0.5, 10e-6, 0.10)
    assert TOKEN_ID_BYTES == 4


def test_workload_micro_batches():
    # ceil(C / B): enough micro-batches of B to hold the concurrency, whatever the stage count.
    assert Workload().micro_batches == 4
    # C not a multiple of B rounds up: ceil(70 / 16) = ceil(4.375) = 5; ceil(100 / 16) = 7.
    assert Workload(concurrency=70).micro_batches == 5
    assert Workload(concurrency=100).micro_batches == 7
    # C = B: one micro-batch holds everything.
    assert Workload(concurrency=16).micro_batches == 1
    # ceil(17 / 16) = 2 (one full batch and one of a single sequence).
    assert Workload(concurrency=17).micro_batches == 2
    # B = 1: one micro-batch per sequence, ceil(64 / 1) = 64.
    assert Workload(batch_size=1).micro_batches == 64


def test_round_trip_adds_b_over_o_prompts_per_round():
    # ROUND = TPOT + (B / O) * TTFT: in steady state a micro-batch of B sequences, each living O
    # rounds, retires and admits B / O sequences per round, and their prefill runs in its steps.
    # Defaults B / O = 16 / 128 = 0.125: 100 ms + 0.125 * 800 ms = 200 ms.
    assert round_trip(Workload(), 0.1, 0.8) == pytest.approx(0.1 + 16 / 128 * 0.8, rel=EXACT)
    assert round_trip(Workload(), 0.1, 0.8) == pytest.approx(0.2, rel=EXACT)
    # B 8, O 256: 8 / 256 = 1/32 of a prompt per round: 100 + 800 / 32 = 125 ms.
    assert round_trip(Workload(batch_size=8, output_tokens=256), 0.1, 0.8) == pytest.approx(0.125, rel=EXACT)
    # B = O: a whole prompt every round, 100 + 800 = 900 ms.
    assert round_trip(Workload(batch_size=16, output_tokens=16), 0.1, 0.8) == pytest.approx(0.9, rel=EXACT)
    # Neither P nor C enters (P only through TTFT, C is what the round trip divides).
    assert round_trip(Workload(prompt_tokens=2048, concurrency=256), 0.1, 0.8) == pytest.approx(0.2, rel=EXACT)
    # No prefill, no extra: ROUND = TPOT.
    assert round_trip(Workload(), 0.1, 0.0) == 0.1


def test_catalog_figures_used_below():
    a, l4, t4 = CATALOG["A100-40G"], CATALOG["L4"], CATALOG["T4"]
    assert (a.memory, a.memory_bandwidth, a.flops, a.interconnect) == (A100_MEM, A100_BW, A100_F, A100_NVL)
    assert (l4.memory, l4.memory_bandwidth, l4.flops, l4.interconnect) == (L4_MEM, L4_BW, L4_F, L4_PCIE)
    assert (t4.memory_bandwidth, t4.flops) == (T4_BW, T4_F)


def test_llama2_70b_params_and_bytes():
    m = m70()
    assert m.dim_head == 128                     # 8192 / 64
    assert P70 == 855_654_400
    assert m.params_per_layer == P70
    assert m.layer_bytes == LB70 == 1_711_308_800
    # Embedding V*H*b = 32000 * 8192 * 2 = 524,288,000; LM head adds the final norm: + 8192*2.
    assert m.embedding_bytes == V70 * H70 * B2 == 524_288_000
    assert m.head_bytes == (V70 * H70 + H70) * B2 == 524_304_384
    # Total = 80 * 855,654,400 + embedding 262,144,000 + LM head 262,144,000 + final norm 8,192
    #       = 68,976,648,192 (the published "69B" figure).
    assert m.total_params == 80 * P70 + 2 * V70 * H70 + H70 == 68_976_648_192


def test_llama2_7b_params():
    m = m7()
    assert m.params_per_layer == P7 == 202_383_360
    # 32 * 202,383,360 + 2 * 131,072,000 + 4096 = 6,738,415,616 (the published "6.7B").
    assert m.total_params == 32 * P7 + 2 * V7 * H7 + H7 == 6_738_415_616


def test_qwen_attention_bias_adds_qkv_bias():
    m = BUILTIN_MODELS["qwen2.5-72b"]
    # Same attention as Llama-2-70B, I = 29568, plus q/k/v biases (64 + 2*8) * 128 = 10,240.
    expected = (8192 * 8192 + 2 * 8192 * 8 * 128 + 8192 * 8192 + 3 * 8192 * 29568 + 2 * 8192
                + (64 + 2 * 8) * 128)
    assert m.params_per_layer == expected


def test_kv_and_activation_bytes_per_token():
    # 70B: 2 (K and V) * 8 KV heads * 128 * 2 bytes = 4096 B per token per layer (GQA: 8x less
    # than the 64 query heads would need). 7B (MHA): 2 * 32 * 128 * 2 = 16,384 B.
    assert m70().kv_bytes_per_token_per_layer == KV70_TOK == 4096
    assert m7().kv_bytes_per_token_per_layer == KV7_TOK == 16384
    # Hidden state between stages: H * b = 8192 * 2 = 16,384 B (70B), 4096 * 2 = 8192 B (7B).
    assert m70().activation_bytes_per_token == 16384
    assert m7().activation_bytes_per_token == 8192


def test_local_kv_heads_split_then_replicated():
    # 8 KV heads: TP 1, 2, 4, 8 split them (8, 4, 2, 1); TP 16 replicates: 1 head per rank.
    assert [local_kv_heads(m70(), d) for d in (1, 2, 4, 8, 16)] == [8, 4, 2, 1, 1]
    assert local_kv_heads(m7(), 4) == 8          # 32 / 4


# ---------------------------------------------------------------------------------------
# Communication

def test_ring_allreduce_hand_values():
    m = BATCH * H70 * B2                         # one decode micro-batch: 16 * 8192 * 2 = 262,144 B
    assert ring_allreduce_time(m, 1, A100_NVL, ALPHA) == 0.0
    # d = 2: 2 (2-1) (10 us + 262144 / (2 * 300e9)) = 2 * (10 us + 0.43691 us) = 20.874 us
    d2 = 2 * 1 * (10e-6 + 262144 / (2 * 300e9))
    assert ring_allreduce_time(m, 2, A100_NVL, ALPHA) == pytest.approx(d2, rel=EXACT)
    assert d2 == pytest.approx(20.874e-6, rel=1e-4)
    # d = 4: 2 (4-1) (10 us + 262144 / (4 * 300e9)) = 6 * (10 us + 0.21845 us) = 61.311 us
    d4 = 6 * (10e-6 + 262144 / (4 * 300e9))
    assert ring_allreduce_time(m, 4, A100_NVL, ALPHA) == pytest.approx(d4, rel=EXACT)
    assert d4 == pytest.approx(61.311e-6, rel=1e-4)


def test_send_time_and_hops():
    # 1 Gbps = 125e6 B/s, 1 ms. 16 decode tokens of 70B: 16 * 16384 = 262,144 B
    #   1 ms + 262144 / 125e6 = 1 ms + 2.097152 ms = 3.097152 ms
    assert send_time(262144, GBPS, 1e-3) == pytest.approx(3.097152e-3, rel=EXACT)
    assert hop_decode_time(m70(), Workload(), GBPS, 1e-3) == pytest.approx(3.097152e-3, rel=EXACT)
    # One 512-token prompt: 512 * 16384 = 8,388,608 B -> 1 ms + 67.108864 ms = 68.108864 ms
    assert hop_prefill_time(m70(), Workload(), GBPS, 1e-3) == pytest.approx(68.108864e-3, rel=EXACT)
    assert send_time(0, GBPS, 0.5e-3) == 0.5e-3


def test_link_token_capacity():
    # Per output token a stage link carries its decode activation plus P/O prompt activations:
    #   16384 * (1 + 512/128) = 81,920 B  ->  125e6 / 81920 = 1525.88 tokens/s on 1 Gbps.
    assert link_token_capacity(m70(), Workload(), GBPS) == pytest.approx(125e6 / 81920, rel=EXACT)
    # Coordinator link in: token ids, 4 * (1 + 512/128) = 20 B per output token -> 6.25e6 tokens/s.
    assert coordinator_token_capacity(Workload(), GBPS) == pytest.approx(125e6 / 20, rel=EXACT)
    # Coordinator link out: one 4-byte token id per output token -> 125e6 / 4 = 31.25e6 tokens/s.
    assert coordinator_out_capacity(GBPS) == pytest.approx(125e6 / 4, rel=EXACT)


# ---------------------------------------------------------------------------------------
# Per-layer times

def test_decode_layer_70b_a100_tp1_memory_bound():
    m, g = m70(), CATALOG["A100-40G"]
    # bytes = weights 1,711,308,800 + KV read 16 * 576.5 * 4096 = 37,781,504  -> 1,749,090,304
    nbytes = LB70 + BATCH * MEAN_CTX * KV70_TOK
    assert nbytes == 1_749_090_304
    # flops = 2 * 855,654,400 * 16 = 27,380,940,800 + attention 4 * 16 * 576.5 * 128 * 64
    #       = 302,252,032  -> 2.7683e10;  / (312e12 * 0.5) = 0.177 ms
    flops = 2 * P70 * BATCH + 4 * BATCH * MEAN_CTX * HD70 * NH70
    t_mem, t_flop = nbytes / (A100_BW * ETA_MEM), flops / (A100_F * ETA_F)
    # memory: 1.749e9 / (1555e9 * 0.7 = 1.0885e12) = 1.6069 ms  >  0.177 ms: memory-bound
    assert t_mem > 5 * t_flop
    assert t_mem == pytest.approx(1.6069e-3, rel=1e-4)
    # TP 1: no all-reduce.
    got = decode_layer_time(m, g, 1, BATCH, MEAN_CTX, A100_NVL)
    assert got == pytest.approx(t_mem, rel=EXACT)


def test_decode_layer_70b_a100_tp4_with_allreduce():
    m, g = m70(), CATALOG["A100-40G"]
    # Per rank: weights 1,711,308,800 / 4 = 427,827,200; KV heads 8 / 4 = 2 -> 1024 B/token:
    #   16 * 576.5 * 1024 = 9,445,376  ->  437,272,576 B / 1.0885e12 = 0.40172 ms (memory-bound:
    #   flops (27,380,940,800 / 4 + 4 * 16 * 576.5 * 128 * 16) / 156e12 = 0.0444 ms)
    kv_tok = 2 * (KV70 // 4) * HD70 * B2
    nbytes = LB70 / 4 + BATCH * MEAN_CTX * kv_tok
    flops = 2 * P70 / 4 * BATCH + 4 * BATCH * MEAN_CTX * HD70 * (NH70 // 4)
    compute = roofline(nbytes, flops, A100_BW, A100_F)
    assert compute == pytest.approx(0.40172e-3, rel=1e-4)
    # Two all-reduces per layer (after attention and after the MLP) of 16 * 8192 * 2 = 262,144 B:
    #   2 * 6 * (10 us + 262144 / (4 * 300e9)) = 2 * 61.311 us = 122.62 us
    comm = 2 * 6 * (ALPHA + BATCH * H70 * B2 / (4 * A100_NVL))
    assert comm == pytest.approx(122.62e-6, rel=1e-4)
    got = decode_layer_time(m, g, 4, BATCH, MEAN_CTX, A100_NVL)
    assert got == pytest.approx(compute + comm, rel=EXACT)       # 0.52434 ms


def test_prefill_layer_70b_a100_512_tokens_compute_bound():
    m, g = m70(), CATALOG["A100-40G"]
    # flops = 2 * 855,654,400 * 512 = 876,190,105,600 + causal attention 2 * 512^2 * 128 * 64
    #       = 4,294,967,296  ->  880,485,072,896 FLOPs / 156e12 = 5.6441 ms
    flops = 2 * P70 * P + 2 * P * P * HD70 * NH70
    assert flops == 880_485_072_896
    # bytes = weights + the KV written: 1,711,308,800 + 512 * 4096 -> / 1.0885e12 = 1.5741 ms
    nbytes = LB70 + P * KV70_TOK
    assert flops / (A100_F * ETA_F) > 3 * nbytes / (A100_BW * ETA_MEM)   # compute-bound
    expected = flops / (A100_F * ETA_F)
    assert expected == pytest.approx(5.6441e-3, rel=1e-4)
    assert prefill_layer_time(m, g, 1, P, A100_NVL) == pytest.approx(expected, rel=EXACT)


def test_prefill_layer_short_prompt_is_memory_bound():
    # 16 tokens: flops 2 * 855.65e6 * 16 + 2 * 16^2 * 128 * 64 = 2.738e10 -> 0.176 ms, but the
    # weights still have to be read: (1,711,308,800 + 16 * 4096) / 1.0885e12 = 1.5722 ms.
    m, g = m70(), CATALOG["A100-40G"]
    nbytes = LB70 + 16 * KV70_TOK
    flops = 2 * P70 * 16 + 2 * 16 * 16 * HD70 * NH70
    assert nbytes / (A100_BW * ETA_MEM) > flops / (A100_F * ETA_F)
    assert prefill_layer_time(m, g, 1, 16, A100_NVL) == pytest.approx(nbytes / (A100_BW * ETA_MEM), rel=EXACT)


def test_prefill_layer_tp2_adds_two_allreduces_of_the_prompt():
    m, g = m70(), CATALOG["A100-40G"]
    flops = 2 * P70 / 2 * P + 2 * P * P * HD70 * (NH70 // 2)
    nbytes = LB70 / 2 + P * (2 * 4 * HD70 * B2)
    # all-reduce of 512 * 8192 * 2 = 8,388,608 B over 2 GPUs: 2 * (10 us + 8388608 / 600e9)
    #   = 2 * (10 + 13.98) us = 47.96 us, twice per layer = 95.92 us
    comm = 2 * (2 * 1 * (ALPHA + P * H70 * B2 / (2 * A100_NVL)))
    assert comm == pytest.approx(95.92e-6, rel=1e-4)
    assert prefill_layer_time(m, g, 2, P, A100_NVL) == pytest.approx(
        roofline(nbytes, flops, A100_BW, A100_F) + comm, rel=EXACT)


def test_efficiency_factors_scale_the_roofline():
    # With both efficiencies at 1 the decode step is the raw datasheet roofline:
    #   1,749,090,304 / 1555e9 = 1.1248 ms  (0.7 x the default 1.6069 ms)
    m, g = m70(), CATALOG["A100-40G"]
    p = CostParams(mem_efficiency=1.0, flops_efficiency=1.0)
    got = decode_layer_time(m, g, 1, BATCH, MEAN_CTX, A100_NVL, p)
    assert got == pytest.approx((LB70 + BATCH * MEAN_CTX * KV70_TOK) / A100_BW, rel=EXACT)


# ---------------------------------------------------------------------------------------
# Stage cost: rate and memory

def test_stage_cost_70b_a100_tp1():
    m, g, w = m70(), CATALOG["A100-40G"], Workload()
    sc = stage_cost(m, g, 1, w, A100_NVL)
    dec = (LB70 + BATCH * MEAN_CTX * KV70_TOK) / (A100_BW * ETA_MEM)          # 1.6069 ms
    pre = (2 * P70 * P + 2 * P * P * HD70 * NH70) / (A100_F * ETA_F)           # 5.6441 ms
    assert sc.decode_layer_s == pytest.approx(dec, rel=EXACT)
    assert sc.prefill_layer_s == pytest.approx(pre, rel=EXACT)
    # layer_rate = 1 / (dec / B + pre / O) = 1 / (1.6069/16 + 5.6441/128 ms)
    #            = 1 / (100.43 us + 44.095 us) = 6919.2 output tokens x layers / s
    rate = 1 / (dec / BATCH + pre / O)
    assert sc.layer_rate == pytest.approx(rate, rel=EXACT)
    assert rate == pytest.approx(6919.2, rel=1e-4)
    assert sc.capacity(18) == pytest.approx(rate / 18, rel=EXACT)            # 384.4 tokens/s
    assert sc.capacity(0) == math.inf
    # Memory per layer per GPU: weights 1,711,308,800 + KV for 64 sequences x 640 tokens:
    #   64 * 640 * 4096 = 167,772,160  ->  1,879,080,960 B
    mpl = LB70 + CONC * CTX * KV70_TOK
    assert mpl == 1_879_080_960
    assert sc.mem_per_layer == mpl
    # Usable: 40e9 * 0.9 = 36e9 minus the workspace of one prompt in flight
    #   512 * (4 * 8192 + 2 * 28672) * 2 = 92,274,688  ->  35,907,725,312 B
    ws = P * (4 * H70 + 2 * I70) * B2
    assert ws == 92_274_688
    usable = A100_MEM * (1 - HEADROOM) - ws
    assert sc.usable_memory == pytest.approx(usable, rel=EXACT)
    emb, head = V70 * H70 * B2, (V70 * H70 + H70) * B2
    assert (sc.embed_bytes, sc.head_bytes) == (emb, head)
    # max layers: 35,907,725,312 / 1,879,080,960 = 19.11 -> 19; with the embedding (first stage)
    # (35,907,725,312 - 524,288,000) / ... = 18.83 -> 18; the LM head alike; both: 18.55 -> 18.
    assert sc.max_layers() == math.floor(usable / mpl) == 19
    assert sc.max_layers(first=True) == math.floor((usable - emb) / mpl) == 18
    assert sc.max_layers(last=True) == math.floor((usable - head) / mpl) == 18
    assert sc.max_layers(first=True, last=True) == math.floor((usable - emb - head) / mpl) == 18
    assert sc.memory_used(18, first=True, last=False) == 18 * mpl + emb


def test_stage_cost_70b_a100_tp4_memory():
    sc = stage_cost(m70(), CATALOG["A100-40G"], 4, Workload(), A100_NVL)
    # Weights / 4 = 427,827,200; KV split over ranks (2 of 8 heads): 64 * 640 * 1024 = 41,943,040
    mpl = LB70 / 4 + CONC * CTX * (2 * 2 * HD70 * B2)
    assert sc.mem_per_layer == mpl == 469_770_240
    # Workspace keeps 4 H per token whole and shards the MLP: 512 * (32768 + 2 * 7168) * 2
    usable = A100_MEM * 0.9 - P * (4 * H70 + 2 * I70 / 4) * B2
    assert sc.usable_memory == pytest.approx(usable, rel=EXACT)
    emb, head = V70 * H70 * B2 / 4, (V70 * H70 + H70) * B2 / 4
    # 35,951,765,504 / 469,770,240 = 76.53 -> 76; minus both embedding and head shards: 75.97 -> 75
    assert sc.max_layers() == math.floor(usable / mpl) == 76
    assert sc.max_layers(True, True) == math.floor((usable - emb - head) / mpl) == 75


def test_kv_cache_replicated_past_num_kv_heads():
    # TP 8: one KV head per rank; TP 16 cannot split 8 heads further, each rank keeps a copy of
    # one head, so the KV bytes per GPU stop shrinking: 64 * 640 * (2 * 1 * 128 * 2) = 20,971,520.
    w = Workload()
    s8 = stage_cost(m70(), CATALOG["A100-40G"], 8, w, A100_NVL)
    s16 = stage_cost(m70(), CATALOG["A100-40G"], 16, w, A100_NVL)
    kv_rank = CONC * CTX * (2 * 1 * HD70 * B2)
    assert kv_rank == 20_971_520
    assert s8.mem_per_layer == LB70 / 8 + kv_rank
    assert s16.mem_per_layer == LB70 / 16 + kv_rank      # not + kv_rank / 2


# ---------------------------------------------------------------------------------------
# LM head (final norm + vocabulary projection), run by the last stage only:
#   lm_head_time(tokens) = roofline( head_bytes / d + tokens * V / d * 4  [fp32 logits],
#                                    2 * V * H / d * tokens )
# On every decode step it runs on B tokens; on every prompt only on its last position (1 token).

# Llama-3-8B: 32 layers, H 4096, I 14336, 32 query heads, 8 KV heads, vocab 128,256, bf16.
H3, I3, NH3, KV3, HD3, V3 = 4096, 14336, 32, 8, 128, 128256


def test_lm_head_70b_a100_decode_is_memory_bound():
    m, g = m70(), CATALOG["A100-40G"]
    # head_bytes = (32000 * 8192 + 8192) * 2 = 524,304,384; logits 16 * 32000 * 4 = 2,048,000
    #   -> 526,352,384 B / 1.0885e12 = 0.48356 ms
    # flops = 2 * 32000 * 8192 * 16 = 8,388,608,000 / 1.56e14 = 0.0538 ms  -> memory-bound
    nbytes = (V70 * H70 + H70) * B2 + BATCH * V70 * 4
    flops = 2 * V70 * H70 * BATCH
    assert nbytes == 526_352_384 and flops == 8_388_608_000
    t_mem, t_flop = nbytes / (A100_BW * ETA_MEM), flops / (A100_F * ETA_F)
    assert t_mem > 5 * t_flop
    assert t_mem == pytest.approx(0.48356e-3, rel=1e-4)
    assert lm_head_time(m, g, 1, BATCH) == pytest.approx(t_mem, rel=EXACT)
    # About 0.30 of one decode layer (1.6069 ms): the 32k vocabulary is small next to H and I.
    dec = (LB70 + BATCH * MEAN_CTX * KV70_TOK) / (A100_BW * ETA_MEM)
    assert t_mem / dec == pytest.approx(0.3009, rel=1e-3)
    # The prompt's last position only: 524,304,384 + 32000 * 4 = 524,432,384 B -> 0.48179 ms
    pre = ((V70 * H70 + H70) * B2 + V70 * 4) / (A100_BW * ETA_MEM)
    assert pre == pytest.approx(0.48179e-3, rel=1e-4)
    assert lm_head_time(m, g, 1, 1) == pytest.approx(pre, rel=EXACT)
    # Vocabulary-parallel over TP 4: bytes and flops both / 4, no communication term:
    #   526,352,384 / 4 = 131,588,096 B -> 0.12089 ms
    assert lm_head_time(m, g, 4, BATCH) == pytest.approx(t_mem / 4, rel=EXACT)
    assert t_mem / 4 == pytest.approx(0.12089e-3, rel=1e-4)
    # StageCost carries both, and the head's share per output token:
    #   0.48356 / 16 + 0.48179 / 128 ms = 30.222 + 3.764 us = 33.986 us
    sc = stage_cost(m, g, 1, Workload(), A100_NVL)
    assert sc.head_decode_s == pytest.approx(t_mem, rel=EXACT)
    assert sc.head_prefill_s == pytest.approx(pre, rel=EXACT)
    per_token = t_mem / BATCH + pre / O
    assert per_token == pytest.approx(33.986e-6, rel=1e-4)
    assert sc.head_cost_per_token == pytest.approx(per_token, rel=EXACT)
    # Last stage of 16 layers: 1 / (16 / 6919.2 + 33.986 us) = 1 / (2312.4 + 34.0 us) = 426.19
    # tokens/s, against 6919.2 / 16 = 432.45 for the same stage in the middle of a pipeline.
    rate = 1 / (dec / BATCH + (2 * P70 * P + 2 * P * P * HD70 * NH70) / (A100_F * ETA_F) / O)
    assert sc.capacity(16) == pytest.approx(rate / 16, rel=EXACT)
    assert sc.capacity(16, last=True) == pytest.approx(1 / (16 / rate + per_token), rel=EXACT)
    assert sc.capacity(16, last=True) == pytest.approx(426.19, rel=1e-4)
    # A last stage with no layers is still bounded by its LM head.
    assert sc.capacity(0, last=True) == pytest.approx(1 / per_token, rel=EXACT)


def test_lm_head_large_vocab_costs_more_than_a_layer():
    m, g = BUILTIN_MODELS["llama-3-8b"], CATALOG["A100-40G"]
    assert (m.hidden_size, m.intermediate_size, m.num_heads, m.num_kv_heads, m.vocab_size,
            m.bytes_per_param) == (H3, I3, NH3, KV3, V3, 2)
    # One layer: 4096^2 (q) + 2 * 4096 * 1024 (k, v) + 4096^2 (o) + 3 * 4096 * 14336 + 2 * 4096
    #   = 16,777,216 + 8,388,608 + 16,777,216 + 176,160,768 + 8,192 = 218,112,000 params
    p3 = H3 * NH3 * HD3 + 2 * H3 * KV3 * HD3 + NH3 * HD3 * H3 + 3 * H3 * I3 + 2 * H3
    assert p3 == m.params_per_layer == 218_112_000
    kv3_tok = 2 * KV3 * HD3 * 2                                   # 4096 B
    # Decode layer: 436,224,000 + 16 * 576.5 * 4096 (= 37,781,504) = 474,005,504 B -> 0.43547 ms
    dec = (p3 * 2 + BATCH * MEAN_CTX * kv3_tok) / (A100_BW * ETA_MEM)
    assert dec == pytest.approx(0.43547e-3, rel=1e-4)
    assert decode_layer_time(m, g, 1, BATCH, MEAN_CTX, A100_NVL) == pytest.approx(dec, rel=EXACT)
    # LM head, decode: (128256 * 4096 + 4096) * 2 = 1,050,681,344 B of weights (2.41 layers)
    #   + 16 * 128256 * 4 = 8,208,384 B of logits = 1,058,889,728 B -> 0.97280 ms, 2.23 layers;
    #   flops 2 * 128256 * 4096 * 16 = 16,810,770,432 / 1.56e14 = 0.108 ms: memory-bound.
    head_w = (V3 * H3 + H3) * 2
    assert head_w == m.head_bytes == 1_050_681_344
    nbytes, flops = head_w + BATCH * V3 * 4, 2 * V3 * H3 * BATCH
    assert nbytes == 1_058_889_728 and flops == 16_810_770_432
    head_dec = nbytes / (A100_BW * ETA_MEM)
    assert head_dec > flops / (A100_F * ETA_F)
    assert head_dec == pytest.approx(0.97280e-3, rel=1e-4)
    assert lm_head_time(m, g, 1, BATCH) == pytest.approx(head_dec, rel=EXACT)
    assert head_dec > 2 * dec                                      # 0.97280 / 0.43547 = 2.234
    # Prefill head: 1,050,681,344 + 128256 * 4 = 1,051,194,368 B -> 0.96573 ms
    head_pre = (head_w + V3 * 4) / (A100_BW * ETA_MEM)
    assert head_pre == pytest.approx(0.96573e-3, rel=1e-4)
    assert lm_head_time(m, g, 1, 1) == pytest.approx(head_pre, rel=EXACT)
    # Per output token: head 0.97280 / 16 + 0.96573 / 128 ms = 60.800 + 7.545 = 68.345 us,
    # a layer 0.43547 / 16 + 1.44548 / 128 ms = 27.217 + 11.293 = 38.509 us (prefill layer:
    # (2 * 218,112,000 * 512 + 2 * 512^2 * 128 * 32 = 225,494,171,648) / 1.56e14 = 1.44548 ms).
    pre = (2 * p3 * P + 2 * P * P * HD3 * NH3) / (A100_F * ETA_F)
    assert pre == pytest.approx(1.44548e-3, rel=1e-4)
    per_head = head_dec / BATCH + head_pre / O
    per_layer = dec / BATCH + pre / O
    assert per_head == pytest.approx(68.345e-6, rel=1e-4)
    assert per_layer == pytest.approx(38.509e-6, rel=1e-4)
    assert per_head > per_layer                                    # 1.77 layers' worth
    sc = stage_cost(m, g, 1, Workload(), A100_NVL)
    assert sc.head_cost_per_token == pytest.approx(per_head, rel=EXACT)
    # All 32 layers on one stage (first and last): 1 / (32 * 38.509 + 68.345 us) = 768.85
    # tokens/s instead of 1 / (32 * 38.509 us) = 811.49 without the head.
    assert sc.capacity(32) == pytest.approx(1 / (32 * per_layer), rel=EXACT)
    assert sc.capacity(32, last=True) == pytest.approx(1 / (32 * per_layer + per_head), rel=EXACT)
    assert sc.capacity(32, last=True) == pytest.approx(768.85, rel=1e-4)


# ---------------------------------------------------------------------------------------
# Calibration against Helix's published Llama-2-70B profiles (ms per layer, TP 1).
# Source: the Helix artifact (Mei et al., ASPLOS'25), simulator/model_manager/llama2_70b/
# {a100,l4,t4}/{decode,prompt}_bs2time.csv: decode at batch 2 = 1.4 / 6.9 / 7.1 ms,
# prompt of 500 tokens = 4 / 20 / 30 ms. docs/cost-model.md tabulates the comparison.

@pytest.mark.parametrize("gpu,bw,f,helix_decode,helix_prefill", [
    ("A100-40G", A100_BW, A100_F, 1.4e-3, 4e-3),
    ("L4", L4_BW, L4_F, 6.9e-3, 20e-3),
    ("T4", T4_BW, T4_F, 7.1e-3, 30e-3),
])
def test_close_to_helix_profiles(gpu, bw, f, helix_decode, helix_prefill):
    m, g = m70(), CATALOG[gpu]
    dec = decode_layer_time(m, g, 1, 2, MEAN_CTX, 0)
    pre = prefill_layer_time(m, g, 1, 500, 0)
    assert dec == pytest.approx((LB70 + 2 * MEAN_CTX * KV70_TOK) / (bw * ETA_MEM), rel=EXACT)
    assert pre == pytest.approx((2 * P70 * 500 + 2 * 500 * 500 * HD70 * NH70) / (f * ETA_F), rel=EXACT)
    # Decode: the model is 8-18% slower than measured (eta_mem 0.7 is a conservative choice;
    # the profiles imply 75-83% of datasheet bandwidth). Prefill: within a factor 1.4 either way.
    assert 1.0 <= dec / helix_decode <= 1.2
    assert 0.7 <= pre / helix_prefill <= 1.4


# ---------------------------------------------------------------------------------------
# Profiles

def test_profile_table_interpolation_and_extrapolation():
    t = ProfileTable(((2, 1.4), (16, 1.5), (100, 2.5)))
    assert t.ms(2) == pytest.approx(1.4, rel=EXACT)
    assert t.ms(1) == 1.4                                   # below the first point: clamped
    assert t.ms(9) == pytest.approx(1.4 + 0.1 * 7 / 14, rel=EXACT)       # 1.45
    assert t.ms(16) == pytest.approx(1.5, rel=EXACT)
    assert t.ms(58) == pytest.approx(1.5 + 1.0 * 42 / 84, rel=EXACT)     # 2.0
    # beyond the last point: the last segment's slope 1.0 / 84 ms per sequence
    assert t.ms(200) == pytest.approx(2.5 + 1.0 * 100 / 84, rel=EXACT)   # 3.6905
    one = ProfileTable(((500, 4.0),))
    assert one.ms(250) == 4.0                               # single point: constant below
    assert one.ms(1000) == pytest.approx(8.0, rel=EXACT)    # ... and proportional above
    falling = ProfileTable(((1, 2.0), (2, 1.0)))
    assert falling.ms(10) == 0.0                            # extrapolation never goes negative


PROFILED = """
name: profiled
gpu_types:
  A100-40G:
    profiles:
      llama-2-70b:
        decode_ms: {2: 1.4, 16: 1.5}
        prefill_ms: {250: 2, 500: 4}
nodes:
  - {name: n0, gpu: A100-40G, count: 4}
"""


def test_profile_replaces_roofline():
    c = loads_cluster(PROFILED)
    g = c.node("n0").gpu
    assert g.memory_bandwidth == A100_BW                   # the catalog figures are kept
    m = m70()
    # TP 1, batch 16: the table's 1.5 ms; the context no longer matters.
    assert decode_layer_time(m, g, 1, 16, MEAN_CTX, A100_NVL) == pytest.approx(1.5e-3, rel=EXACT)
    # TP 2: 1.5 ms / 2 + two all-reduces of 262,144 B: 2 * 2 * (10 us + 262144 / 600e9) = 41.75 us
    comm = 2 * 2 * (ALPHA + BATCH * H70 * B2 / (2 * A100_NVL))
    assert decode_layer_time(m, g, 2, 16, MEAN_CTX, A100_NVL) == pytest.approx(0.75e-3 + comm, rel=EXACT)
    # Prefill 512 tokens: extrapolated from (250, 2), (500, 4): 4 + 2 * 12 / 250 = 4.096 ms
    assert prefill_layer_time(m, g, 1, 512, A100_NVL) == pytest.approx(4.096e-3, rel=EXACT)
    # stage rate: 1 / (1.5/16 + 4.096/128 ms) = 1 / (93.75 + 32) us = 7952.3
    sc = stage_cost(m, g, 1, Workload(), A100_NVL)
    assert sc.layer_rate == pytest.approx(1 / (1.5e-3 / 16 + 4.096e-3 / 128), rel=EXACT)
    # other models keep the roofline
    assert decode_layer_time(m7(), g, 1, 16, MEAN_CTX, A100_NVL) == pytest.approx(
        (LB7 + 16 * MEAN_CTX * KV7_TOK) / (A100_BW * ETA_MEM), rel=EXACT)


# ---------------------------------------------------------------------------------------
# Pipeline evaluation on a hand-made cluster: llama-2-7b over an A100-40G node (coordinator)
# and an L4 node, one GPU each, joined by one link.

def tiny(bandwidth="1Gbps"):
    return loads_cluster(f"""
name: tiny
nodes:
  - {{name: a, gpu: A100-40G, count: 1}}
  - {{name: b, gpu: L4, count: 1}}
network:
  default: {{bandwidth: 40Gbps, latency: 0.1ms}}   # never used: the rule below beats it
  links:
    - {{between: [a, b], bandwidth: {bandwidth}, latency: 1ms}}
""")


# Per-layer times of llama-2-7b, by hand (all memory-bound decode, compute-bound prefill):
#   decode bytes = 404,766,720 + 16 * 576.5 * 16384 (= 151,126,016) = 555,892,736
#     A100: / 1.0885e12 = 0.51070 ms     L4: / (300e9 * 0.7 = 210e9) = 2.64711 ms
#   prefill flops = 2 * 202,383,360 * 512 + 2 * 512^2 * 128 * 32 = 209,388,044,288
#     A100: / 156e12 = 1.34223 ms        L4: / (121e12 * 0.5 = 60.5e12) = 3.46096 ms
DEC_BYTES7 = LB7 + BATCH * MEAN_CTX * KV7_TOK
PRE_FLOPS7 = 2 * P7 * P + 2 * P * P * HD7 * NH7
DEC_A, DEC_B = DEC_BYTES7 / (A100_BW * ETA_MEM), DEC_BYTES7 / (L4_BW * ETA_MEM)
PRE_A, PRE_B = PRE_FLOPS7 / (A100_F * ETA_F), PRE_FLOPS7 / (L4_F * ETA_F)
RATE_A = 1 / (DEC_A / BATCH + PRE_A / O)       # 23,582 token-layers/s
RATE_B = 1 / (DEC_B / BATCH + PRE_B / O)       #  5,195 token-layers/s (192.48 us per token-layer)
# The LM head runs on the last stage, b (L4), memory-bound on both paths:
#   weights (32000 * 4096 + 4096) * 2 = 262,152,192 B
#   decode, 16 tokens: + 16 * 32000 * 4 = 2,048,000 B of logits = 264,200,192 B / 210e9
#     = 1.25810 ms   (flops 2 * 32000 * 4096 * 16 = 4.194e9 / 60.5e12 = 0.069 ms)
#   prefill, the prompt's last token: + 128,000 B = 262,280,192 B / 210e9 = 1.24895 ms
#   per output token: 1.25810 / 16 + 1.24895 / 128 ms = 78.631 + 9.757 us = 88.388 us
HEAD_W7 = (V7 * H7 + H7) * B2
HEAD_DEC_B = (HEAD_W7 + BATCH * V7 * 4) / (L4_BW * ETA_MEM)
HEAD_PRE_B = (HEAD_W7 + V7 * 4) / (L4_BW * ETA_MEM)
HEAD_TOK_B = HEAD_DEC_B / BATCH + HEAD_PRE_B / O


def hand_tpot(link_bw, la, lb):
    # coordinator a -> stage a: inside node a (NVLink 300 GB/s, 5 us), 16 token ids = 64 B
    # stage a -> stage b: 1 ms + 16 * 8192 B / link_bw
    # LM head on stage b: 1.25810 ms
    # stage b -> coordinator a: 1 ms + 64 B / link_bw
    return ((5e-6 + BATCH * 4 / A100_NVL) + (1e-3 + BATCH * H7 * B2 / link_bw) + HEAD_DEC_B
            + (1e-3 + BATCH * 4 / link_bw) + la * DEC_A + lb * DEC_B)


def test_tiny_cluster_lm_head_by_hand():
    assert HEAD_W7 == 262_152_192
    assert HEAD_DEC_B == pytest.approx(1.25810e-3, rel=1e-4)
    assert HEAD_PRE_B == pytest.approx(1.24895e-3, rel=1e-4)
    assert HEAD_TOK_B == pytest.approx(88.388e-6, rel=1e-4)
    # memory-bound: the flops of either path are far below
    assert HEAD_DEC_B > 10 * 2 * V7 * H7 * BATCH / (L4_F * ETA_F)
    sc = stage_cost(m7(), CATALOG["L4"], 1, Workload(), L4_PCIE)
    assert (sc.head_decode_s, sc.head_prefill_s) == pytest.approx((HEAD_DEC_B, HEAD_PRE_B), rel=EXACT)


def test_tiny_cluster_links():
    c = tiny()
    assert c.link("a", "b").bandwidth == 125e6 and c.link("a", "b").latency == 1e-3
    assert c.link("b", "a").bandwidth == 125e6
    assert c.link("a", "a").bandwidth == A100_NVL and c.link("a", "a").latency == 5e-6


def test_evaluate_pipeline_16_16_stage_bound():
    c, w = tiny(), Workload()
    cc = CostCache(m7(), w)
    r = evaluate_pipeline(c, cc, ["a", "b"], [1, 1], [16, 16])
    # TPOT = 5.0002 us + (1 + 1.048576) ms + LM head 1.25810 ms + (1 + 0.000512) ms
    #        + 16 * 0.51070 + 16 * 2.64711 ms
    #      = 0.005 + 2.048576 + 1.25810 + 1.000512 + 8.17114 + 42.35373 ms = 54.8371 ms
    tpot = hand_tpot(GBPS, 16, 16)
    assert r.tpot_s == pytest.approx(tpot, rel=EXACT)
    assert tpot == pytest.approx(54.837e-3, rel=1e-4)
    # TTFT = (5 us + 2048 B / 300e9) + (1 ms + 512 * 8192 / 125e6 = 33.554432 ms)
    #        + LM head on the last token 1.24895 ms + (1 ms + 4 B / 125e6)
    #        + 16 * 1.34223 + 16 * 3.46096 ms = 113.66 ms
    ttft = ((5e-6 + P * 4 / A100_NVL) + (1e-3 + P * H7 * B2 / GBPS) + HEAD_PRE_B + (1e-3 + 4 / GBPS)
            + 16 * PRE_A + 16 * PRE_B)
    assert r.ttft_s == pytest.approx(ttft, rel=EXACT)
    assert ttft == pytest.approx(113.66e-3, rel=1e-4)
    # Limits, output tokens/s:
    #   stage a: 23,582 / 16 = 1473.9
    #   stage b (last, runs the LM head): 1 / (16 * 192.48 us + 88.388 us) = 1 / 3168.1 us
    #     = 315.64   <- the minimum (324.70 without the head)
    #   link a->b: 125e6 / (8192 * (1 + 512/128)) = 125e6 / 40960 = 3051.8
    #   coordinator in (NVLink): 300e9 / 20 = 1.5e10;  out: 125e6 / 4 = 3.125e7
    #   concurrency / round trip: ROUND = TPOT + (16 / 128) * TTFT = 54.837 + 14.207 = 69.044 ms,
    #     64 / 69.044 ms = 926.94
    rnd = tpot + BATCH / O * ttft
    assert r.round_s == pytest.approx(rnd, rel=EXACT)
    assert rnd == pytest.approx(69.044e-3, rel=1e-4)
    assert CONC / rnd == pytest.approx(926.94, rel=1e-4)
    cap_b = 1 / (16 / RATE_B + HEAD_TOK_B)
    assert r.stage_capacity == pytest.approx((RATE_A / 16, cap_b), rel=EXACT)
    assert r.bottleneck == "stage 1 compute"
    assert r.throughput == pytest.approx(cap_b, rel=EXACT)
    assert r.throughput == pytest.approx(315.64, rel=1e-4)
    assert CONC / rnd > r.throughput and 125e6 / 40960 > r.throughput
    # Memory per GPU: 16 * (404,766,720 + 64 * 640 * 16384 = 671,088,640) = 17,213,685,760
    #   + embedding 32000 * 4096 * 2 = 262,144,000 on a / + LM head 262,152,192 on b
    mpl = LB7 + CONC * CTX * KV7_TOK
    assert r.memory_per_gpu == (16 * mpl + V7 * H7 * B2, 16 * mpl + (V7 * H7 + H7) * B2)
    # Usable: 36e9 / 21.6e9 minus workspace 512 * (4 * 4096 + 2 * 11008) * 2 = 39,321,600
    ws = P * (4 * H7 + 2 * I7) * B2
    assert r.memory_limit == pytest.approx((A100_MEM * 0.9 - ws, L4_MEM * 0.9 - ws), rel=EXACT)
    assert r.fits


def test_evaluate_pipeline_28_4_moves_the_bottleneck_to_the_a100():
    r = evaluate_pipeline(tiny(), CostCache(m7(), Workload()), ["a", "b"], [1, 1], [28, 4])
    # stage a: 23,582 / 28 = 842.2 < stage b with the LM head: 1 / (4 * 192.48 + 88.388 us)
    #   = 1 / 858.32 us = 1165.1
    # TPOT = 0.005 + 2.048576 + 1.25810 + 1.000512 + 28 * 0.51070 + 4 * 2.64711 ms = 29.200 ms
    # TTFT = 0.005 + 34.554 + 1.24895 + 1.00000 + 28 * 1.34223 + 4 * 3.46096 ms
    #      = 36.808 + 37.582 + 13.844 = 88.235 ms
    # ROUND = 29.200 + 88.235 / 8 = 29.200 + 11.029 = 40.229 ms;  64 / 40.229 ms = 1590.9
    tpot = hand_tpot(GBPS, 28, 4)
    assert tpot == pytest.approx(29.200e-3, rel=1e-4)
    ttft = ((5e-6 + P * 4 / A100_NVL) + (1e-3 + P * H7 * B2 / GBPS) + HEAD_PRE_B + (1e-3 + 4 / GBPS)
            + 28 * PRE_A + 4 * PRE_B)
    assert ttft == pytest.approx(88.235e-3, rel=1e-4)
    assert r.ttft_s == pytest.approx(ttft, rel=EXACT)
    rnd = tpot + BATCH / O * ttft
    assert rnd == pytest.approx(40.229e-3, rel=1e-4)
    assert r.round_s == pytest.approx(rnd, rel=EXACT)
    assert CONC / rnd == pytest.approx(1590.9, rel=1e-4)
    assert r.stage_capacity == pytest.approx((RATE_A / 28, 1 / (4 / RATE_B + HEAD_TOK_B)), rel=EXACT)
    assert r.stage_capacity[1] == pytest.approx(1165.1, rel=1e-4)
    assert r.bottleneck == "stage 0 compute"
    assert r.throughput == pytest.approx(RATE_A / 28, rel=EXACT)
    assert r.throughput == pytest.approx(842.22, rel=1e-4)
    assert r.tpot_s == pytest.approx(tpot, rel=EXACT)


def test_single_stage_pipeline_runs_the_lm_head():
    # All 32 layers of llama-2-7b on the A100 (the coordinator's node): the one stage is also the
    # last and pays the LM head, here on the A100 (1.0885e12 B/s):
    #   decode 264,200,192 B -> 0.24272 ms; prefill 262,280,192 B -> 0.24096 ms
    #   per output token 0.24272 / 16 + 0.24096 / 128 ms = 15.170 + 1.882 = 17.052 us
    #   capacity 1 / (32 / 23,582 + 17.052 us) = 1 / (1356.95 + 17.05 us) = 727.80 (736.95 without)
    r = evaluate_pipeline(tiny(), CostCache(m7(), Workload()), ["a"], [1], [32])
    head_dec = (HEAD_W7 + BATCH * V7 * 4) / (A100_BW * ETA_MEM)
    head_pre = (HEAD_W7 + V7 * 4) / (A100_BW * ETA_MEM)
    cap = 1 / (32 / RATE_A + head_dec / BATCH + head_pre / O)
    assert cap == pytest.approx(727.80, rel=1e-4)
    assert r.fits and r.bottleneck == "stage 0 compute"
    assert r.throughput == pytest.approx(cap, rel=EXACT)
    # Both coordinator links are node a's own fabric (5 us + 64 B / 300e9):
    #   TPOT = 2 * 5.0002 us + 0.24272 + 32 * 0.51070 ms = 16.595 ms
    #   TTFT = (5 us + 2048 B / 300e9) + (5 us + 4 B / 300e9) + 0.24096 + 32 * 1.34223 ms = 43.202 ms
    tpot = 2 * (5e-6 + BATCH * 4 / A100_NVL) + head_dec + 32 * DEC_A
    ttft = (5e-6 + P * 4 / A100_NVL) + (5e-6 + 4 / A100_NVL) + head_pre + 32 * PRE_A
    assert (tpot, ttft) == pytest.approx((16.595e-3, 43.202e-3), rel=1e-4)
    assert r.tpot_s == pytest.approx(tpot, rel=EXACT)
    assert r.ttft_s == pytest.approx(ttft, rel=EXACT)
    # ROUND = 16.595 + 43.202 / 8 = 16.595 + 5.400 = 21.995 ms; 64 / 21.995 ms = 2909.7 > 727.80
    rnd = tpot + BATCH / O * ttft
    assert rnd == pytest.approx(21.995e-3, rel=1e-4)
    assert r.round_s == pytest.approx(rnd, rel=EXACT)
    assert CONC / rnd == pytest.approx(2909.7, rel=1e-4)


def tiny_ttft_16_16():
    # TTFT of the 16 + 16 split on 1 Gbps (test_evaluate_pipeline_16_16_stage_bound): 113.66 ms
    return ((5e-6 + P * 4 / A100_NVL) + (1e-3 + P * H7 * B2 / GBPS) + HEAD_PRE_B + (1e-3 + 4 / GBPS)
            + 16 * PRE_A + 16 * PRE_B)


def test_evaluate_pipeline_concurrency_bound():
    # Concurrency 16 (one micro-batch in flight). TPOT and TTFT do not depend on C (B and the
    # decode context do not change): 54.837 and 113.66 ms, so
    #   ROUND = 54.837 + (16 / 128) * 113.66 = 54.837 + 14.207 = 69.044 ms
    #   16 / 69.044 ms = 231.73 < stage b's 315.64
    w = Workload(concurrency=16)
    r = evaluate_pipeline(tiny(), CostCache(m7(), w), ["a", "b"], [1, 1], [16, 16])
    tpot, ttft = hand_tpot(GBPS, 16, 16), tiny_ttft_16_16()
    rnd = tpot + BATCH / O * ttft
    assert r.tpot_s == pytest.approx(tpot, rel=EXACT)
    assert r.ttft_s == pytest.approx(ttft, rel=EXACT)
    assert r.round_s == pytest.approx(rnd, rel=EXACT)
    assert r.bottleneck == "concurrency / round trip"
    assert r.throughput == pytest.approx(16 / rnd, rel=EXACT)
    assert r.throughput == pytest.approx(231.73, rel=1e-4)
    # Decode alone (the former C / TPOT) would have promised 16 / 54.837 ms = 291.77, 26% more:
    # the ratio is ROUND / TPOT = 1 + B TTFT / (O TPOT) = 1 + 16 * 113.66 / (128 * 54.837) = 1.2591.
    assert (16 / tpot) / r.throughput == pytest.approx(1 + BATCH * ttft / (O * tpot), rel=EXACT)
    assert 1 + BATCH * ttft / (O * tpot) == pytest.approx(1.2591, rel=1e-4)


def test_round_trip_binds_where_decode_alone_would_not():
    # Concurrency 20: decode alone gives 20 / 54.837 ms = 364.72, above stage b's 315.64, but the
    # round trip with its prefill share gives 20 / 69.044 ms = 289.67, below it.
    w = Workload(concurrency=20)
    r = evaluate_pipeline(tiny(), CostCache(m7(), w), ["a", "b"], [1, 1], [16, 16])
    tpot, ttft = hand_tpot(GBPS, 16, 16), tiny_ttft_16_16()
    rnd = tpot + BATCH / O * ttft
    assert 20 / tpot == pytest.approx(364.72, rel=1e-4)
    assert 20 / tpot > 1 / (16 / RATE_B + HEAD_TOK_B) > 20 / rnd
    assert r.bottleneck == "concurrency / round trip"
    assert r.throughput == pytest.approx(20 / rnd, rel=EXACT)
    assert r.throughput == pytest.approx(289.67, rel=1e-4)


def test_evaluate_pipeline_link_bound():
    # 100 Mbps = 12.5e6 B/s: link a->b carries 12.5e6 / 40960 = 305.18 tokens/s < stage b's 315.64
    r = evaluate_pipeline(tiny("100Mbps"), CostCache(m7(), Workload()), ["a", "b"], [1, 1], [16, 16])
    assert r.bottleneck == "link a->b"
    assert r.throughput == pytest.approx(12.5e6 / (H7 * B2 * (1 + P / O)), rel=EXACT)
    assert r.throughput == pytest.approx(305.18, rel=1e-4)
    # TPOT now carries the slower hops: a->b 1 ms + 131,072 / 12.5e6 = 11.486 ms, b->coordinator
    # 1 ms + 64 / 12.5e6 = 1.00512 ms:
    #   0.005 + 11.486 + 1.25810 + 1.00512 + 8.17114 + 42.35373 ms = 64.279 ms
    tpot = hand_tpot(12.5e6, 16, 16)
    assert tpot == pytest.approx(64.279e-3, rel=1e-4)
    assert r.tpot_s == pytest.approx(tpot, rel=EXACT)
    # TTFT: the prompt hop is 1 ms + 4,194,304 / 12.5e6 = 336.54 ms:
    #   0.005 + 336.544 + 1.24895 + 1.00000 + 21.4757 + 55.3754 ms = 415.65 ms
    # ROUND = 64.279 + 415.65 / 8 = 64.279 + 51.956 = 116.235 ms; 64 / 116.235 ms = 550.61 > 305.18
    ttft = ((5e-6 + P * 4 / A100_NVL) + (1e-3 + P * H7 * B2 / 12.5e6) + HEAD_PRE_B + (1e-3 + 4 / 12.5e6)
            + 16 * PRE_A + 16 * PRE_B)
    assert ttft == pytest.approx(415.65e-3, rel=1e-4)
    rnd = tpot + BATCH / O * ttft
    assert r.round_s == pytest.approx(rnd, rel=EXACT)
    assert CONC / rnd == pytest.approx(550.61, rel=1e-4)


def test_shared_link_divides_its_capacity():
    # 200 Mbps: alone the link carries 25e6 / 40960 = 610.35 tokens/s (stage b, 315.64, binds);
    # shared by two pipelines each gets 305.18 and the link binds.
    c, cc = tiny("200Mbps"), CostCache(m7(), Workload())
    alone = evaluate_pipeline(c, cc, ["a", "b"], [1, 1], [16, 16])
    shared = evaluate_pipeline(c, cc, ["a", "b"], [1, 1], [16, 16], Counter({("a", "b"): 2}))
    assert alone.bottleneck == "stage 1 compute"
    assert shared.bottleneck == "link a->b"
    assert shared.throughput == pytest.approx(25e6 / 40960 / 2, rel=EXACT)
    assert shared.tpot_s == alone.tpot_s            # sharing limits throughput, not latency


def test_evaluate_pipeline_not_fitting_gives_zero():
    # 20 layers on the L4: 20 * 1,075,855,360 + 262,152,192 = 21,779,259,392 B
    #   > usable 21,600,000,000 - 39,321,600 = 21,560,678,400 B
    r = evaluate_pipeline(tiny(), CostCache(m7(), Workload()), ["a", "b"], [1, 1], [12, 20])
    assert 20 * (LB7 + CONC * CTX * KV7_TOK) + (V7 * H7 + H7) * B2 > L4_MEM * 0.9 - P * (4 * H7 + 2 * I7) * B2
    assert not r.fits
    assert r.throughput == 0.0


def test_coordinator_link_in_capacity():
    # Link in (coordinator -> first stage) carries the prompt's P token ids and one id per
    # decode step: 4 * (512 + 128) / 128 = 20 B per output token.
    ov = pipeline_overheads(tiny(), CostCache(m7(), Workload()), ["a", "b"], [1, 1])
    lim = dict((what, x) for x, what in ov.limits)
    assert lim["coordinator link in"] == pytest.approx(A100_NVL / 20, rel=EXACT)


def test_coordinator_link_out_carries_one_token_id_per_output_token():
    # Link out (last stage -> coordinator) returns only the sampled token: one 4-byte id per
    # output token, no prompt ids (the TPOT/TTFT terms send B ids and 1 id over it).
    ov = pipeline_overheads(tiny(), CostCache(m7(), Workload()), ["a", "b"], [1, 1])
    lim = dict((what, x) for x, what in ov.limits)
    # 125e6 B/s / 4 B = 31.25e6 output tokens/s (5x the link-in formula's 6.25e6)
    assert lim["coordinator link out"] == pytest.approx(125e6 / TOKEN_ID_BYTES, rel=EXACT)
    assert lim["coordinator link out"] == pytest.approx(31.25e6, rel=EXACT)


# ---------------------------------------------------------------------------------------
# docs/cost-model.md section 12: Llama-2-70B over five A100-40G nodes, one GPU each, 1 Gbps and
# 1 ms between nodes, 16 layers per stage, coordinator on n0.

FIVE = """
name: five
nodes:
  - {name: n0, gpu: A100-40G, count: 1}
  - {name: n1, gpu: A100-40G, count: 1}
  - {name: n2, gpu: A100-40G, count: 1}
  - {name: n3, gpu: A100-40G, count: 1}
  - {name: n4, gpu: A100-40G, count: 1}
network:
  default: {bandwidth: 1Gbps, latency: 1ms}
"""


def test_worked_example_five_a100s():
    c = loads_cluster(FIVE)
    r = evaluate_pipeline(c, CostCache(m70(), Workload()), ["n0", "n1", "n2", "n3", "n4"],
                          [1] * 5, [16] * 5)
    dec = (LB70 + BATCH * MEAN_CTX * KV70_TOK) / (A100_BW * ETA_MEM)            # 1.6069 ms
    pre = (2 * P70 * P + 2 * P * P * HD70 * NH70) / (A100_F * ETA_F)             # 5.6441 ms
    rate = 1 / (dec / BATCH + pre / O)                                           # 6919.2
    head_w = (V70 * H70 + H70) * B2
    head_dec = (head_w + BATCH * V70 * 4) / (A100_BW * ETA_MEM)                  # 0.48356 ms
    head_pre = (head_w + V70 * 4) / (A100_BW * ETA_MEM)                          # 0.48179 ms
    # TPOT = (5 us + 64 B / 300e9) + 80 * 1.6069 + 4 * (1 + 262,144 / 125e6 = 3.097152)
    #        + 0.48356 + (1 + 64 / 125e6) ms = 0.005 + 128.5505 + 12.3886 + 0.4836 + 1.0005
    #      = 142.428 ms
    tpot = ((5e-6 + BATCH * 4 / A100_NVL) + 80 * dec + 4 * (1e-3 + BATCH * H70 * B2 / GBPS)
            + head_dec + (1e-3 + BATCH * 4 / GBPS))
    assert tpot == pytest.approx(142.428e-3, rel=1e-4)
    assert r.tpot_s == pytest.approx(tpot, rel=EXACT)
    # TTFT = (5 us + 2048 B / 300e9) + 80 * 5.6441 + 4 * (1 + 8,388,608 / 125e6 = 68.108864)
    #        + 0.48179 + (1 + 4 / 125e6) ms = 0.005 + 451.5308 + 272.4355 + 0.4818 + 1.0000
    #      = 725.453 ms
    ttft = ((5e-6 + P * 4 / A100_NVL) + 80 * pre + 4 * (1e-3 + P * H70 * B2 / GBPS)
            + head_pre + (1e-3 + 4 / GBPS))
    assert ttft == pytest.approx(725.453e-3, rel=1e-4)
    assert r.ttft_s == pytest.approx(ttft, rel=EXACT)
    # ROUND = TPOT + (16 / 128) * TTFT = 142.428 + 90.682 = 233.110 ms
    #   = 80 layers * (1.6069 + 5.6441 / 8 = 2.3124 ms) = 184.992 ms
    #     + fixed 13.878 (TPOT: hops, LM head, coordinator) + 273.922 / 8 (TTFT's) = 48.118 ms
    rnd = tpot + BATCH / O * ttft
    assert rnd == pytest.approx(233.110e-3, rel=1e-4)
    assert r.round_s == pytest.approx(rnd, rel=EXACT)
    assert 80 * (dec + pre / 8) == pytest.approx(184.992e-3, rel=1e-4)
    # Stages 0-3: 6919.2 / 16 = 432.45; stage 4: 1 / (16 / 6919.2 + 33.986 us)
    #   = 1 / (2312.40 + 33.99 us) = 426.19
    # Links 125e6 / 81,920 = 1525.9; coordinator in 300e9 / 20 = 1.5e10, out 125e6 / 4 = 3.125e7;
    # concurrency / round trip 64 / 233.110 ms = 274.55  <- the minimum, 35.6% below stage 4
    last = 1 / (16 / rate + head_dec / BATCH + head_pre / O)
    assert r.stage_capacity == pytest.approx((rate / 16,) * 4 + (last,), rel=EXACT)
    assert (rate / 16, last) == pytest.approx((432.45, 426.19), rel=1e-4)
    assert CONC / rnd == pytest.approx(274.55, rel=1e-4)
    assert r.fits and r.bottleneck == "concurrency / round trip"
    assert r.throughput == pytest.approx(CONC / rnd, rel=EXACT)
    assert 1 - r.throughput / last == pytest.approx(0.3558, rel=1e-3)
    # Each micro-batch keeps a middle stage busy 16 * 2.3124 = 36.998 ms per 233.110 ms round;
    # 64 sequences are 4 micro-batches' worth: 4 * 36.998 / 233.110 = 63.5% busy = 274.55 / 432.45.
    assert 4 * 16 * (dec + pre / 8) / rnd == pytest.approx(r.throughput / (rate / 16), rel=EXACT)
    assert r.throughput / (rate / 16) == pytest.approx(0.6349, rel=1e-3)
    # Decode alone (the former C / TPOT) gave 64 / 142.428 ms = 449.35, above the stage bound:
    # 1 + B TTFT / (O TPOT) = 1 + 16 * 725.453 / (128 * 142.428) = 1.6367 times the true bound.
    assert CONC / tpot == pytest.approx(449.35, rel=1e-4)
    assert (CONC / tpot) / r.throughput == pytest.approx(1 + BATCH * ttft / (O * tpot), rel=EXACT)
    assert 1 + BATCH * ttft / (O * tpot) == pytest.approx(1.6367, rel=1e-4)
    # The gateway and the simulator run ceil(64 / 16) = 4 micro-batch loops of 16: the stages
    # idle while they travel, which is this bound.
    assert Workload().micro_batches == 4


@pytest.mark.parametrize("conc,bottleneck,expected", [
    # 99 / 233.110 ms = 424.69 < 426.19: still the round trip
    (99, "concurrency / round trip", 424.69),
    # 100 / 233.110 ms = 428.98 > 426.19: the last stage (LM head) binds again
    (100, "stage 4 compute", 426.19),
])
def test_worked_example_five_a100s_more_in_flight(conc, bottleneck, expected):
    # docs/cost-model.md section 12: the stage bound needs C >= 426.19 * 0.233110 = 99.35 sequences.
    # TPOT, TTFT and the round trip do not depend on C; the KV cache does: at C = 100 a layer takes
    # 1,711,308,800 + 100 * 640 * 4096 = 1,973,452,800 B, the last stage 16 * 1,973,452,800
    # + 524,304,384 = 32,099,549,184 B of its 35,907,725,312: 16 layers per stage still fit
    # (at most 18 in the middle, 17 at either end).
    c = loads_cluster(FIVE)
    r = evaluate_pipeline(c, CostCache(m70(), Workload(concurrency=conc)), ["n0", "n1", "n2", "n3", "n4"],
                          [1] * 5, [16] * 5)
    dec = (LB70 + BATCH * MEAN_CTX * KV70_TOK) / (A100_BW * ETA_MEM)
    pre = (2 * P70 * P + 2 * P * P * HD70 * NH70) / (A100_F * ETA_F)
    rate = 1 / (dec / BATCH + pre / O)
    head_w = (V70 * H70 + H70) * B2
    head_dec = (head_w + BATCH * V70 * 4) / (A100_BW * ETA_MEM)
    head_pre = (head_w + V70 * 4) / (A100_BW * ETA_MEM)
    tpot = ((5e-6 + BATCH * 4 / A100_NVL) + 80 * dec + 4 * (1e-3 + BATCH * H70 * B2 / GBPS)
            + head_dec + (1e-3 + BATCH * 4 / GBPS))
    ttft = ((5e-6 + P * 4 / A100_NVL) + 80 * pre + 4 * (1e-3 + P * H70 * B2 / GBPS)
            + head_pre + (1e-3 + 4 / GBPS))
    rnd = tpot + BATCH / O * ttft
    last = 1 / (16 / rate + head_dec / BATCH + head_pre / O)
    assert 99 < last * rnd < 100                       # 99.35
    mpl = LB70 + conc * CTX * KV70_TOK
    assert r.memory_per_gpu[-1] == 16 * mpl + head_w
    assert r.fits and r.round_s == pytest.approx(rnd, rel=EXACT)
    assert r.bottleneck == bottleneck
    assert r.throughput == pytest.approx(min(conc / rnd, last), rel=EXACT)
    assert r.throughput == pytest.approx(expected, rel=1e-4)
