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
    """Seconds per optimizer step: roofline compute + exposed communication + pipeline bubble."""
    e = BYTES[s.dtype]
    mb = _micro_batches(s, dp)
    tokens = s.global_batch * m.seq_length
    model_flops = m.flops_per_token() * tokens
    hw_flops = model_flops * (4 / 3 if s.activation_checkpointing else 1)  # + one recomputed forward
    compute = hw_flops / (c.num_gpus * c.peak_tflops * 1e12 * c.efficiency)
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
    p2p = 0.0 if pp == 1 else 2 * mb * s.micro_batch * m.seq_length * m.hidden * e / (pp_bw * 1e9)
    pipelined = compute + tp_comm + p2p
    bubble = pipelined * (pp - 1) / mb
    total = pipelined + bubble + dp_comm
    return {"compute_s": compute, "tp_comm_s": tp_comm, "dp_comm_s": dp_comm, "pp_p2p_s": p2p,
            "bubble_s": bubble, "step_s": total, "tokens_per_s": tokens / total,
            "mfu": model_flops / (total * c.num_gpus * c.peak_tflops * 1e12)}


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
