"""Weights from any layout to any layout, through full serial-named tensors: a checkpoint of any
format re-split into a model, and a live model gathered into the consolidated format. (Adam state
moves with the whole training state: ``elastic``.)"""

from .consolidated import save_consolidated
from .load import open_checkpoint


def load_consolidated_into(model, ckpt_dir, tag=None) -> dict:
    """Re-split a checkpoint (consolidated, or any format ``open_checkpoint`` reads) into a model
    of any layout (serial, TP, pipeline). Returns its meta (with "step"). Weights only."""
    from megagpt.parallel.layout import load_full_state_dict

    src = open_checkpoint(ckpt_dir, tag, tokenizer=False)
    load_full_state_dict(getattr(model, "module", model), src.state_dict())
    return src.meta()


def _on_rank0(write):
    """``write()`` on rank 0 (or in a plain process), then a barrier: its result on rank 0, None elsewhere."""
    import torch.distributed as dist

    out = write() if not dist.is_initialized() or dist.get_rank() == 0 else None
    if dist.is_initialized():
        dist.barrier()
    return out


def save_consolidated_from_engine(engine_or_model, out_dir, cfg, tokenizer_path=None, run_config=None,
                                  step=None, force=False):
    """Gather a live model/engine of any layout (collective: call on every rank); rank 0 writes."""
    from megagpt.parallel.layout import full_state_dict

    full = full_state_dict(engine_or_model)
    return _on_rank0(lambda: save_consolidated(out_dir, full, cfg, tokenizer_path, run_config, step, force))
