"""Process group set-up and the DeepSpeed JSON, filled from our config and checked up front.

The dp world size is known from the launcher's environment (``WORLD_SIZE``) before any process
group exists, so batch-size arithmetic and DeepSpeed-config mistakes fail as one clear message
before ``init_distributed``. A plain ``python`` run gets a 1-rank group on a free local port.
"""
from __future__ import annotations

import copy
import json
import os
import socket

import torch.distributed as dist

from megagpt.errors import MegaGPTError

# top-level keys DeepSpeed 0.19 understands (its own config parser silently ignores others)
_DS_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "scheduler", "zero_optimization", "fp16", "bf16", "bfloat16", "amp", "torch_autocast",
    "steps_per_print", "wall_clock_breakdown", "dump_state", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "communication_data_type",
    "seq_parallel_communication_data_type", "activation_checkpointing", "flops_profiler", "tensorboard",
    "wandb", "csv_monitor", "comet", "comms_logger", "aio", "data_efficiency", "data_types", "compression_training",
    "checkpoint", "elasticity", "autotuning", "pipeline", "memory_breakdown", "disable_allgather",
    "graph_harvesting", "use_data_before_expert_parallelism", "timers", "nebula", "weight_quantization",
    "hybrid_engine", "eigenvalue", "progressive_layer_drop", "curriculum_learning", "quantize_training",
    "sparse_attention", "load_universal_checkpoint", "compile", "zenflow", "tensor_parallel",
}


def dp_world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _fill(d: dict, key: str, value, file: str | None, path: str):
    """Replace "auto" (or a missing key) by our value; an explicit different value is an error."""
    cur = d.get(key, "auto")
    if cur == "auto":
        d[key] = value
    elif cur != value and not (isinstance(cur, (int, float)) and isinstance(value, (int, float))
                               and abs(cur - value) <= 1e-12 * max(1.0, abs(value))):
        raise MegaGPTError(f"is {cur!r} but the megagpt config gives {value!r}; set it to \"auto\" or make "
                           f"them agree", file=file, key=path)


# a DeepSpeed JSON's own defaults when a run gives none (finetuning may): quiet logs
_NO_JSON = {"steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def build_ds_config(path: str | None, optim, dp_world: int, *, micro_batch_size: int,
                    gradient_accumulation_steps: int = 1, global_batch_size: int | None = None,
                    zero_stage: int | None = None, required: bool = True) -> dict:
    """The DeepSpeed config of a pretraining or finetuning run: the JSON at ``path`` with every "auto"
    (or missing key) filled from our config, the batch sizes checked.

    ``optim``: the AdamW settings (``megagpt.config.OptimConfig``: ``TrainConfig``, ``FinetuneConfig``)
    → ``optimizer.params`` and ``gradient_clipping``; the batch sizes → the three batch keys;
    ``zero_stage`` (if given) → ``zero_optimization.stage``. A value the JSON states differently is
    an error naming the file and the key, as is a ``scheduler`` block (the LR schedule is ours,
    ``megagpt.train.schedule``). Without ``path`` (``required=False``) the run starts from an empty
    JSON. Errors about our own settings carry their ``key`` (``global_batch_size``), about the JSON
    its ``file``."""
    if not path:
        if required:
            raise MegaGPTError("no DeepSpeed config: pass --deepspeed_config ds_configs/zero2.json (or set it in "
                               "the config)", key="deepspeed_config")
        ds = dict(_NO_JSON)
    elif not os.path.isfile(path):
        raise MegaGPTError("DeepSpeed config not found", file=path)
    else:
        try:
            with open(path) as f:
                ds = json.load(f)
        except json.JSONDecodeError as e:
            raise MegaGPTError(f"not valid JSON: {e.msg}", file=path, line=e.lineno) from None
    if not isinstance(ds, dict):
        raise MegaGPTError(f"the top level must be a JSON object of DeepSpeed keys, not a {type(ds).__name__}",
                           file=path)
    ds = copy.deepcopy(ds)
    unknown = sorted(set(ds) - _DS_KEYS)
    if unknown:
        raise MegaGPTError(f"unknown DeepSpeed config key(s) {', '.join(map(repr, unknown))}", file=path,
                           key=unknown[0])
    mbs, ga = micro_batch_size, gradient_accumulation_steps
    gbs = mbs * ga * dp_world
    if global_batch_size is not None and global_batch_size != gbs:
        raise MegaGPTError(
            f"global_batch_size={global_batch_size} != micro_batch_size {mbs} x gradient_accumulation_steps "
            f"{ga} x data-parallel world {dp_world} = {gbs}", key="global_batch_size")
    _fill(ds, "train_micro_batch_size_per_gpu", mbs, path, "train_micro_batch_size_per_gpu")
    _fill(ds, "gradient_accumulation_steps", ga, path, "gradient_accumulation_steps")
    _fill(ds, "train_batch_size", gbs, path, "train_batch_size")
    _fill(ds, "gradient_clipping", float(optim.clip_grad), path, "gradient_clipping")
    if "scheduler" in ds:
        raise MegaGPTError("remove the 'scheduler' block; megagpt's LR schedule comes from its own config "
                           "(lr, min_lr, lr_warmup_iters, lr_decay_style; finetuning: warmup_frac)", file=path,
                           key="scheduler")
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if str(opt.get("type", "")).lower() not in ("adamw", "adam"):
        raise MegaGPTError(f"{opt.get('type')!r}: megagpt expects AdamW", file=path,
                           key="optimizer.type")
    params = opt.setdefault("params", {})
    for key, val in (("lr", float(optim.lr)), ("betas", [float(optim.adam_beta1), float(optim.adam_beta2)]),
                     ("eps", float(optim.adam_eps)), ("weight_decay", float(optim.weight_decay))):
        if key == "betas" and isinstance(params.get(key), list):
            params[key] = [float(b) for b in params[key]]
        _fill(params, key, val, path, f"optimizer.params.{key}")
    zero = ds.get("zero_optimization", {})
    if zero_stage is not None:
        zero = ds.setdefault("zero_optimization", {})
        _fill(zero, "stage", zero_stage, path, "zero_optimization.stage")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise MegaGPTError(f"{stage!r} must be 0, 1, 2 or 3", file=path,
                           key="zero_optimization.stage")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise MegaGPTError("fp16 and bf16 are both enabled; pick one", file=path, key="fp16")
    try:  # let DeepSpeed's own pydantic models reject bad sub-keys now, not after init
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
        DeepSpeedZeroConfig(**zero)
    except Exception as e:  # pydantic.ValidationError
        first = str(e).strip().splitlines()
        raise MegaGPTError(' '.join(first[:3]), file=path, key="zero_optimization") from None
    return ds


def check_device(ds: dict, path: str | None) -> None:
    """What this machine's accelerator cannot run, in one line (DeepSpeed says it in a traceback per rank)."""
    from deepspeed.accelerator import get_accelerator

    if ds.get("fp16", {}).get("enabled") and not get_accelerator().is_fp16_supported():
        raise MegaGPTError(f"fp16 is not supported on this device ({get_accelerator().device_name()}): use a "
                           f"bf16 config (ds_configs/*bf16*.json) or fp32", file=path, key="fp16.enabled")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous started right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env() -> None:
    """A plain ``python`` run (no launcher set RANK) becomes a 1-rank group on a free local port."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))


def init_distributed(timeout=None):
    """Init the default group via DeepSpeed (gloo on CPU, NCCL on GPU); returns (rank, world).
    ``timeout`` (a timedelta): how long a collective waits for a dead or hung rank before failing.
    The data-parallel group is not the world under TP/PP: it comes from ``parallel.groups``."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    single_process_env()
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kw = {"timeout": timeout} if timeout is not None else {}
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), auto_mpi_discovery=False, **kw)
    release_deepspeed_shm_name()
    _register_node()
    return dist.get_rank(), dist.get_world_size()


def release_deepspeed_shm_name() -> None:
    """Unlink this rank's DeepSpeed CPU shared-memory allreduce buffer name once every rank has it mapped.

    Under the ``deepspeed`` launcher on CPU, DeepSpeed's shm comm op creates a 66 MB
    ``/dev/shm/deepspeed_allreduce_buffer_{uid}_{addr}_{port}_{rank}`` per rank and never unlinks
    it: every run leaked 66 MB x ranks of RAM-backed tmpfs until the machine ran out of memory.
    All ranks map all peers' buffers inside ``init_distributed``, so after a barrier the names can
    go; the mappings (and the memory) live until the processes exit.
    """
    # DeepSpeed creates the buffers exactly when LOCAL_SIZE == world size (every rank agrees on
    # this, so all or none enter the barrier).
    if os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        return
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    dist.barrier()
    try:
        os.remove(name)
    except FileNotFoundError:
        pass


def device():
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    return acc.device_name() if acc.device_name() == "cpu" else f"{acc.device_name()}:{acc.current_device()}"


def node_label() -> str:
    """This rank's node as an operator finds it: host name and the address it reaches the master
    from (hosts may share a name, e.g. containers or network namespaces on one machine)."""
    host = socket.gethostname()
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "29500")
    try:   # a UDP connect only picks the route: no packet is sent
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, int(port), type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.connect(sockaddr)
            return f"{host} ({s.getsockname()[0]})"
    except (OSError, TypeError, ValueError):
        return host


def _multi_node() -> bool:
    local = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE")   # deepspeed / torchrun, mpirun
    return local is not None and int(local) != dist.get_world_size()


def _register_node() -> None:
    """Each rank of a multi-node job leaves its ``node_label`` in the rendezvous store, so that if it
    dies the survivors can say where (``stopped_ranks``)."""
    if _multi_node():
        from torch.distributed.distributed_c10d import _get_default_store

        _get_default_store().set(f"megagpt/node/{dist.get_rank()}", node_label())


class LostRank(int):
    """A rank number that prints with its node: ``f"rank {r}"`` gives ``rank 3 on node gpu7
    (10.0.0.7)``. It is still the int for sets, ``min`` and comparisons."""

    def __new__(cls, rank: int, node: str | None = None):
        self = super().__new__(cls, rank)
        self.node = node
        return self

    def __format__(self, spec):
        return f"{int(self)} on node {self.node}" if self.node else format(int(self), spec)

    __str__ = __repr__ = lambda self: format(self)


def stopped_ranks(grace_s: float = 3.0, lower_wait_s: float | None = None) -> tuple[list, bool]:
    """After a failed collective: (the ranks that did not report back, whether rank 0's store is gone).

    Each survivor marks itself alive in the rendezvous store, waits ``grace_s`` for the others
    (their collectives fail at about the same time) and reads who did: a rank that died or hangs
    never marks. The store lives in rank 0's process, so if it is unreachable rank 0 stopped.

    Across nodes a failure can reach a survivor late: rank 3 dies, its TP peer 2 fails at once and
    waits here, still holding the connection that 2's DP peer 0 is blocked on; 0 fails only when 2
    exits, a grace time later. So a rank that every lower rank has left silent (it would be the one
    to report) waits up to ``lower_wait_s`` more (default 4 x ``grace_s``) for a lower rank to mark;
    the others return at once, and their exit unblocks the late ones.
    In a multi-node job each rank comes back as a ``LostRank`` naming its node (single node: no
    node, the message stays as it was)."""
    import datetime
    import time

    from torch.distributed.distributed_c10d import _get_default_store

    multi = _multi_node()
    try:
        store = _get_default_store()
        rank, world = dist.get_rank(), dist.get_world_size()
        store.set_timeout(datetime.timedelta(seconds=10))
        store.set(f"megagpt/alive/{rank}", "1")
        time.sleep(grace_s)

        def alive(r):
            return store.check([f"megagpt/alive/{r}"])

        end = time.monotonic() + (4 * grace_s if lower_wait_s is None else lower_wait_s)
        while rank > 0 and time.monotonic() < end and not any(alive(r) for r in range(rank)):
            time.sleep(0.1)
        lost = [r for r in range(world) if not alive(r)]
        if not multi:
            return lost, False
        return [LostRank(r, store.get(f"megagpt/node/{r}").decode() if store.check([f"megagpt/node/{r}"])
                         else None) for r in lost], False
    except Exception:
        return [LostRank(0, os.environ.get("MASTER_ADDR") if multi else None)], True


def is_comm_failure(e: BaseException) -> bool:
    """A collective failed because of another rank (closed connection, timeout), not a local bug."""
    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("gloo", "NCCL", "Timed out", "Connection closed", "Connection reset"))
