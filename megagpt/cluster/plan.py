"""Memory and step-time planner: which TP x PP x DP layouts fit, and how fast they should run.

Pure arithmetic on a ``ModelShape`` (from a ``ModelConfig`` or explicit sizes), a ``TrainSetup``
and a ``Cluster``; every formula and assumption is written out in ``docs/planner.md``. Memory is
per GPU, at the peak of a training step: the start of backward (with the optimizer states of
earlier steps and persistent gradient buffers allocated), or the optimizer step when its transient
fp32 gradient partition outweighs the activations.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from megagpt.errors import MegaGPTError

GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SUB_GROUP_SIZE = 10**9  # DeepSpeed zero_optimization.sub_group_size default: ZeRO-3 steps this many at a time


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    vocab: int                 # padded vocabulary (embedding rows)
    ffn: int
    seq_length: int
    kv_heads: int = 0          # 0 = heads (MHA)
    activation: str = "gelu"   # "gelu" (fc -> act -> proj) or "swiglu" (gate, up, down)
    pos_emb: str = "learned"   # "learned" adds max_seq_len x hidden parameters
    max_seq_len: int = 0       # rows of the learned position table (0 = seq_length)
    tied: bool = True
    bias: bool = True
    norm: str = "layernorm"    # "layernorm" (weight+bias) | "rmsnorm" (weight)
    final_norm: bool = True

    @classmethod
    def from_config(cls, cfg, seq_length=None):
        """From a ``megagpt.model.ModelConfig`` (post-LN GPT-1 has no final norm)."""
        return cls(layers=cfg.n_layer, hidden=cfg.n_embd, heads=cfg.n_head, vocab=cfg.padded_vocab_size,
                   ffn=cfg.ffn_dim, seq_length=seq_length or cfg.max_seq_len, kv_heads=cfg.num_kv_heads,
                   activation="swiglu" if cfg.activation == "swiglu" else "gelu", pos_emb=cfg.pos_emb,
                   max_seq_len=cfg.max_seq_len, tied=cfg.tie_embeddings, bias=cfg.bias, norm=cfg.norm,
                   final_norm=cfg.norm_position == "pre")

    @property
    def kv(self):
        return self.kv_heads or self.heads

    def layer_params(self):
        """Each linear has (inputs + bias) x outputs parameters; then two norms."""
        h, b = self.hidden, self.bias
        qkv = (self.heads + 2 * self.kv) * (h // self.heads)
        n_in = 2 if self.activation == "swiglu" else 1   # swiglu: gate and up
        return (h + b) * (qkv + h + n_in * self.ffn) + (self.ffn + b) * h + 2 * self._norm_params()

    def _norm_params(self):
        return self.hidden * (2 if self.norm == "layernorm" and self.bias else 1)

    def embedding_params(self):
        pos = (self.max_seq_len or self.seq_length) * self.hidden if self.pos_emb == "learned" else 0
        return self.vocab * self.hidden + pos

    def largest_tensor_params(self):
        """The V x h token embedding (or untied output matrix): DeepSpeed's "largest layer" for ZeRO-3."""
        return self.vocab * self.hidden

    def head_params(self):
        """Final norm + output projection (a separate matrix unless tied)."""
        return self._norm_params() * self.final_norm + (0 if self.tied else self.vocab * self.hidden)

    def total_params(self):
        return self.layers * self.layer_params() + self.embedding_params() + self.head_params()

    def flops_per_token(self):
        """Model FLOPs per trained token (fwd + bwd = 3x fwd): 6 x matmul params + attention."""
        matmul = self.layers * self.layer_params() + self._norm_params() * self.final_norm + self.vocab * self.hidden
        return 6 * matmul + 12 * self.layers * self.hidden * self.seq_length


@dataclass(frozen=True)
class TrainSetup:
    global_batch: int
    micro_batch: int = 1
    dtype: str = "bf16"               # fp32 = pure fp32 training; bf16/fp16 = mixed precision, fp32 master
    zero_stage: int = 1
    offload_optimizer: bool = False   # ZeRO-Offload: optimizer states (and fp32 master) in CPU memory
    offload_params: bool = False      # ZeRO-3 only: 16-bit parameters in CPU memory too
    activation_checkpointing: bool = False
    sequence_parallel: bool = False
    flash_attention: bool = True      # no s^2 score tensors stored
    dropout: bool = False             # 1-byte masks stored per dropout
    p2p_scatter_gather: bool = False  # Megatron: each TP rank sends 1/tp of a stage's activation (own NIC)


@dataclass(frozen=True)
class Cluster:
    num_gpus: int
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    peak_tflops: float = 989.0        # dense 16-bit tensor-core peak per GPU (H100 SXM)
    efficiency: float = 0.5           # achieved fraction of peak for the matmuls
    intra_node_gbps: float = 450.0    # GB/s per GPU per direction (NVLink)
    inter_node_gbps: float = 50.0     # GB/s per GPU per direction (one 400 Gb/s NIC per GPU)
    reserve_gib: float = 2.0          # CUDA context, allocator fragmentation, comm buffers
    hbm_gbps: float = 3350.0          # GB/s GPU memory bandwidth, for the memory-bound (non-matmul) kernels


# Per-GPU constants by GPU type (docs/planner.md, "Step time"): dense 16-bit peak, NVLink and
# InfiniBand GB/s per GPU per direction, HBM GB/s. The A100 "efficiency" is the one calibrated
# constant, fitted to Narayanan et al. 2021, Table 1 (MEGATRON_WEAK_SCALING below).
A100_EFFICIENCY = 0.645
GPU_PRESETS = {
    "h100": dict(gpu_mem_gib=80.0, peak_tflops=989.0, efficiency=0.5, intra_node_gbps=450.0, inter_node_gbps=50.0,
                 hbm_gbps=3350.0),
    "a100": dict(gpu_mem_gib=80.0, peak_tflops=312.0, efficiency=A100_EFFICIENCY, intra_node_gbps=300.0,
                 inter_node_gbps=25.0, hbm_gbps=2039.0),
}


def memory_breakdown(m: ModelShape, s: TrainSetup, tp=1, pp=1, dp=1):
    """Per-GPU bytes at the step's peak, for the pipeline stage that needs the most."""
    e = BYTES[s.dtype]
    per_stage = m.layers // pp
    rows = []
    for stage in sorted({0, pp - 1}):
        params = per_stage * m.layer_params()
        if stage == 0:
            params += m.embedding_params()
        if stage == pp - 1:
            params += m.head_params()
            if pp > 1 and m.tied:  # the last stage keeps its own copy of the tied matrix
                params += m.vocab * m.hidden
        params /= tp
        in_flight = min(pp - stage, _micro_batches(s, dp))  # 1F1B: stage i holds pp - i micro-batches
        # a layer's backward briefly holds gradients of the MLP hidden (net of freed inputs)
        layer_bwd = (1 + m.ffn / m.hidden) * s.micro_batch * m.seq_length * m.hidden * e / tp
        if s.activation_checkpointing:  # only layer inputs stored; one layer recomputed at a time
            acts = in_flight * per_stage * _ckpt_bytes_per_layer(m, s, tp)
            layer_bwd += activation_bytes_per_layer(m, s, tp)
        else:
            acts = in_flight * per_stage * activation_bytes_per_layer(m, s, tp)
        logits = _output_layer_bytes(m, s, tp) if stage == pp - 1 else 0
        # the logits' tensors are freed before the first layer's backward: the larger one counts
        peak_work = max(logits, layer_bwd)
        row = _state_bytes(params, s, dp, e)
        # ZeRO-3 gathers what it uses at 16 bits: the current layer and the prefetched next one, or the
        # V x h matrix with its full gradient before the reduce-scatter (DeepSpeed's 4 x largest layer)
        biggest = max(m.layer_params(), m.largest_tensor_params())
        row["zero3_live"] = 2 * e * biggest / tp if s.zero_stage == 3 else 0
        row.update(activations=acts, working=peak_work, params_count=params, stage=stage)
        states = row["params"] + row["grads"] + row["optimizer"]
        row["step_total"] = states + row["grads32"]  # optimizer step: activations freed, fp32 grads made
        row["total"] = max(states + acts + peak_work + row["zero3_live"], row["step_total"])
        rows.append(row)
    return max(rows, key=lambda r: r["total"])


def _micro_batches(s, dp):
    return max(1, s.global_batch // (s.micro_batch * dp))


def _state_bytes(n, s, dp, e):
    """Weights, gradients and optimizer states of n parameters under ZeRO stage z over dp ranks,
    as DeepSpeed's ZeRO optimizers hold them (runtime/zero/stage_1_and_2.py, stage3.py).

    grads32: in mixed precision the optimizer step casts the 16-bit gradient partition to an fp32
    copy for Adam (stage 1/2 the whole partition, stage 3 one sub-group at a time) and frees it after
    the step. With --offload-optimizer that copy, the optimizer states and (ZeRO-2/3) the gradient
    partition itself live in CPU memory: reduced gradients go straight to the CPU buffer."""
    z = s.zero_stage
    part = n / (dp if z >= 1 else 1)  # the optimizer's partition
    opt = (12 if e < 4 else 8) * part  # Adam m, v (+ fp32 master weights in mixed precision)
    g = e * n / (dp if z >= 2 else 1)
    w = e * n / (dp if z == 3 else 1)
    g32 = 4 * (min(part, SUB_GROUP_SIZE) if z == 3 else part) if e < 4 else 0
    cpu = 0
    if s.offload_optimizer:
        cpu += opt + 4 * part
        opt = g32 = 0
        if z >= 2:
            g = 0
    if s.offload_params and z == 3:
        cpu += w
        w = 0
    return {"params": w, "grads": g, "optimizer": opt, "grads32": g32, "cpu_offload": cpu}


def activation_bytes_per_layer(m: ModelShape, s: TrainSetup, tp=1):
    """Bytes one transformer layer keeps for backward, per micro-batch (Korthikanti et al. 2022,
    generalised to GQA, SwiGLU, any dtype; see docs/planner.md for the term-by-term list)."""
    e = BYTES[s.dtype]
    sbh = s.micro_batch * m.seq_length * m.hidden
    r = m.kv / m.heads
    mlp = (4 if m.activation == "swiglu" else 2) * m.ffn / m.hidden
    replicated = 4 * e + (2 if s.dropout else 0)  # norm inputs, qkv/fc inputs (+ 2 dropout masks)
    split = (1 + 2 * r + 1 + 1 + mlp) * e         # q, k, v, attention out, proj input, MLP
    if m.pos_emb == "rope":
        split += (1 + r) * e                      # rotated copies of q and k
    per = sbh * (split / tp + replicated / (tp if s.sequence_parallel else 1))
    a, sq = m.heads, s.micro_batch * m.seq_length * m.seq_length
    if s.flash_attention:
        per += 4 * a * s.micro_batch * m.seq_length / tp  # fp32 log-sum-exp per row
    else:
        per += a * sq * ((2 * e + 1) if s.dropout else e) / tp  # softmax (+ mask, dropout out)
    return per


def _output_layer_bytes(m, s, tp):
    """Final norm input + output-projection input, and three fp32 logits-sized tensors at the
    start of backward (log-softmax output saved by cross-entropy, its gradient, the logits'
    gradient); the 16-bit logits themselves are freed once upcast."""
    return (1 + m.final_norm) * _ckpt_bytes_per_layer(m, s, tp) + 12 * s.micro_batch * m.seq_length * m.vocab / tp


def _ckpt_bytes_per_layer(m, s, tp):
    """One layer input (b x s x h, split under sequence parallelism): all a checkpointed layer keeps."""
    return BYTES[s.dtype] * s.micro_batch * m.seq_length * m.hidden / (tp if s.sequence_parallel else 1)


def _ring(nbytes, n, gbps, factor):
    """Ring collective time: all-reduce factor 2, reduce-scatter / all-gather factor 1."""
    return 0.0 if n <= 1 else factor * (n - 1) / n * nbytes / (gbps * 1e9)


def step_time(m: ModelShape, s: TrainSetup, c: Cluster, tp=1, pp=1, dp=1):
    """Seconds per optimizer step: matmuls at ``efficiency`` x peak + memory-bound kernels at HBM
    bandwidth + TP all-reduces, times (1 + bubble), + the DP gradient all-reduce after the last
    micro-batch (Megatron and DeepSpeed do not overlap it with a pipelined backward)."""
    e = BYTES[s.dtype]
    mb = _micro_batches(s, dp)
    tokens = s.global_batch * m.seq_length
    model_flops = m.flops_per_token() * tokens
    hw_flops = model_flops + _recompute_flops_per_token(m) * tokens * s.activation_checkpointing
    compute = hw_flops / (c.num_gpus * c.peak_tflops * 1e12 * c.efficiency)
    # norms, bias + GeLU, dropout, residual adds, softmax: each stored activation byte is written and
    # read once per forward (2x), backward moves twice a forward (4x), a recomputed forward again 2x
    passes = 6 + (2 if s.activation_checkpointing else 0)
    memory = passes * activation_bytes_per_layer(m, s, tp) * (m.layers // pp) * mb / (c.hbm_gbps * 1e9)
    # TP: 2 all-reduces (or all-gather + reduce-scatter with SP) of b*s*h per layer forward, 2 backward
    tp_bw = c.intra_node_gbps if tp <= c.gpus_per_node else c.inter_node_gbps
    n_tp = (6 if s.activation_checkpointing else 4) * (m.layers // pp) * mb
    tp_comm = n_tp * _ring(s.micro_batch * m.seq_length * m.hidden * e, tp, tp_bw, 2)
    # DP: gradients (16-bit in mixed precision) reduced once per step; ZeRO-3 also gathers weights twice
    stage_params = (m.layers // pp * m.layer_params() + m.embedding_params()) / tp
    dp_bw = c.intra_node_gbps if tp * dp <= c.gpus_per_node else c.inter_node_gbps
    volume = 2 + (2 * mb if s.zero_stage == 3 else 0)  # in units of one reduce-scatter
    dp_comm = volume * _ring(stage_params * e, dp, dp_bw, 1)
    # PP: bubble (p-1)/m of the pipelined work, plus the activation sends between stages
    pp_bw = c.intra_node_gbps if tp * dp * pp <= c.gpus_per_node else c.inter_node_gbps
    send = s.micro_batch * m.seq_length * m.hidden * e / (tp if s.p2p_scatter_gather else 1)
    p2p = 0.0 if pp == 1 else 2 * mb * send / (pp_bw * 1e9)
    pipelined = compute + memory + tp_comm + p2p
    bubble = pipelined * (pp - 1) / mb
    total = pipelined + bubble + dp_comm
    return {"compute_s": compute, "memory_s": memory, "tp_comm_s": tp_comm, "dp_comm_s": dp_comm,
            "pp_p2p_s": p2p, "bubble_s": bubble, "step_s": total, "tokens_per_s": tokens / total,
            "hw_tflops_per_gpu": hw_flops / (total * c.num_gpus) / 1e12,
            "mfu": model_flops / (total * c.num_gpus * c.peak_tflops * 1e12)}


def _recompute_flops_per_token(m: ModelShape):
    """Activation checkpointing reruns every layer's forward (1/3 of its fwd + bwd FLOPs), not the
    output projection."""
    output = 6 * (m._norm_params() * m.final_norm + m.vocab * m.hidden)
    return (m.flops_per_token() - output) / 3


# Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM"
# (SC'21), Table 1: GPT weak scaling on Selene (DGX A100-80GB, 8 GPUs per node), seq 2048, vocab
# 51200, fp16, activation recomputation. (params in billions, heads, hidden, layers, TP, PP, GPUs,
# global batch, achieved TFLOP/s per GPU, % of peak.) Micro-batch 1 is our assumption (Table 1
# does not list it).
MEGATRON_WEAK_SCALING = (
    (1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44),
    (3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 44),
    (7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 46),
    (18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43),
    (39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44),
    (76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 45),
    (145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47),
    (310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50),
    (529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52),
    (1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52),
)


def megatron_flops(batch, seq, layers, hidden, vocab):
    """FLOPs per iteration as Narayanan et al. count them (their eq. 3, recomputation included):
    96 B s l h^2 (1 + s/(6h) + V/(16 l h))."""
    return 96 * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))


def megatron_weak_scaling(cluster_overrides=None):
    """Each Table 1 row with the planner's predicted achieved TFLOP/s per GPU (their FLOP count over
    our step time) on the ``a100`` preset: Megatron's layout, fp16, full recomputation, scores
    materialised (no flash attention in 2021), dropout, scatter/gather pipeline sends."""
    rows = []
    for params_b, heads, hidden, layers, tp, pp, gpus, batch, tflops, pct in MEGATRON_WEAK_SCALING:
        m = ModelShape(layers=layers, hidden=hidden, heads=heads, vocab=51200, ffn=4 * hidden, seq_length=2048)
        s = TrainSetup(global_batch=batch, micro_batch=1, dtype="fp16", zero_stage=0, activation_checkpointing=True,
                       flash_attention=False, dropout=True, p2p_scatter_gather=True)
        c = Cluster(num_gpus=gpus, **{**GPU_PRESETS["a100"], **(cluster_overrides or {})})
        t = step_time(m, s, c, tp, pp, gpus // (tp * pp))
        predicted = megatron_flops(batch, 2048, layers, hidden, 51200) / (t["step_s"] * gpus) / 1e12
        rows.append({"params_b": params_b, "model_params_b": m.total_params() / 1e9, "heads": heads,
                     "hidden": hidden, "layers": layers, "tp": tp, "pp": pp, "dp": gpus // (tp * pp), "gpus": gpus,
                     "batch": batch, "published_tflops": tflops, "published_pct": pct,
                     "predicted_tflops": predicted, "predicted_pct": 100 * predicted / c.peak_tflops,
                     "error": predicted / tflops - 1, "time": t})
    return rows


def layouts(m: ModelShape, s: TrainSetup, c: Cluster):
    """Every TP x PP x DP layout of c.num_gpus that the model and batch allow, with memory and
    time, fitting ones first, fastest first. Constraints: tp | heads (and kv heads), tp <=
    gpus_per_node, pp | layers, dp = N / (tp * pp), micro_batch * dp | global_batch, and pp = 1
    under ZeRO-2/3 (DeepSpeed's PipelineEngine refuses them; pipeline.check_zero_stage)."""
    if s.global_batch % s.micro_batch:
        raise MegaGPTError(f"global batch {s.global_batch} is not a multiple of micro batch {s.micro_batch}")
    rows = []
    for tp in range(1, c.gpus_per_node + 1):
        if m.heads % tp or m.kv % tp or c.num_gpus % tp:
            continue
        for pp in range(1, (m.layers if s.zero_stage < 2 else 1) + 1):
            if m.layers % pp or c.num_gpus % (tp * pp):
                continue
            dp = c.num_gpus // (tp * pp)
            if s.global_batch % (s.micro_batch * dp):
                continue
            mem = memory_breakdown(m, s, tp, pp, dp)
            t = step_time(m, s, c, tp, pp, dp)
            budget = (c.gpu_mem_gib - c.reserve_gib) * GIB
            rows.append({"tp": tp, "pp": pp, "dp": dp, "micro_batches": _micro_batches(s, dp),
                         "fits": mem["total"] <= budget, "mem_gib": mem["total"] / GIB,
                         "memory": mem, "time": t})
    rows.sort(key=lambda r: (not r["fits"], r["time"]["step_s"], r["mem_gib"]))
    return rows


def describe(m: ModelShape, s: TrainSetup, c: Cluster):
    return {"model": asdict(m), "params": m.total_params(), "setup": asdict(s), "cluster": asdict(c)}
