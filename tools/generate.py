"""Sample text from a megagpt pretraining checkpoint.

    python tools/generate.py CKPT_DIR --prompt "ROMEO:" [--prompt ...] [--prompt-file F]
        [--tag global_stepN] [--temperature 0.8 --top-k 50 --top-p 0.95 --max-new-tokens 100 --seed 0]

The model config and tokenizer spec come from the checkpoint's client state; the weights are
consolidated from the ZeRO-sharded DeepSpeed files by DeepSpeed's own zero_to_fp32 (ZeRO-0
checkpoints hold the whole module in mp_rank_00_model_states.pt and are read directly).
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.errors import MegaGPTError, cli_main  # noqa: E402


def load_checkpoint(ckpt_dir: str, tag: str | None = None, tokenizer: str | None = None):
    """(GPT with consolidated fp32 weights, Tokenizer, tag) from a pretraining checkpoint dir."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from megagpt.model import GPT, ModelConfig
    from megagpt.tokenizer import load_tokenizer
    from megagpt.train.checkpoint import resume_tag

    if not os.path.isdir(ckpt_dir):
        raise MegaGPTError(f"{ckpt_dir}: checkpoint directory not found")
    tag = tag or resume_tag(ckpt_dir)
    if tag is None:
        raise MegaGPTError(f"{ckpt_dir}: no complete checkpoint (global_stepN/ with a 'complete' marker)")
    states = sorted(glob.glob(os.path.join(ckpt_dir, tag, "*model_states.pt")))
    if not states:
        raise MegaGPTError(f"{ckpt_dir}/{tag}: no *model_states.pt file")
    client = torch.load(states[0], map_location="cpu", weights_only=False)
    if "config" not in client:
        raise MegaGPTError(f"{states[0]}: no megagpt config in the client state (not a megagpt checkpoint)")
    model = GPT(ModelConfig.from_dict(client["config"]["model"]))
    if glob.glob(os.path.join(ckpt_dir, tag, "zero_pp_rank_*optim_states.pt")):  # ZeRO 1-3: consolidate
        sd = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=tag)
    else:  # ZeRO-0: the full module is in mp_rank_00_model_states.pt
        sd = {k: v.float() for k, v in client["module"].items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or not model.cfg.tie_embeddings]
    if missing or unexpected:
        raise MegaGPTError(f"{ckpt_dir}/{tag}: weights do not fit the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    model.tie_weights()
    spec = client.get("tokenizer") or {}
    tok_path = tokenizer or spec.get("path")
    if not tok_path:
        raise MegaGPTError(f"{states[0]}: no tokenizer spec in the checkpoint; pass --tokenizer")
    return model.eval(), load_tokenizer(tok_path), tag


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining --save directory")
    p.add_argument("--tag", help="global_stepN (default: newest complete)")
    p.add_argument("--tokenizer", help="override the tokenizer path stored in the checkpoint")
    p.add_argument("--prompt", action="append", default=[], help="repeatable")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to sample after each prompt (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest token set with probability >= p")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix each step (slower; for checking)")
    a = p.parse_args(argv)

    import torch

    from megagpt.model import generate

    prompts = list(a.prompt)
    if a.prompt_file:
        if not os.path.isfile(a.prompt_file):
            raise MegaGPTError(f"{a.prompt_file}: prompt file not found")
        prompts += [line.rstrip("\n") for line in open(a.prompt_file) if line.strip()]
    if not prompts:
        raise MegaGPTError("no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    model, tok, tag = load_checkpoint(a.checkpoint, a.tag, a.tokenizer)
    gen = torch.Generator().manual_seed(a.seed)
    for i, text in enumerate(prompts):
        ids = tok.encode(text)
        if tok.bos_id is not None and not ids:
            ids = [tok.bos_id]
        budget = min(a.max_new_tokens, model.cfg.max_seq_len - len(ids))
        if budget < 1:
            raise MegaGPTError(f"prompt {i + 1} is {len(ids)} tokens; max_seq_len is {model.cfg.max_seq_len}")
        out = generate(model, ids, budget, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       eos_id=tok.eos_id, use_kv_cache=not a.no_kv_cache, generator=gen)
        print(f"=== [{tag}] prompt {i + 1}: {text!r}")
        print(tok.decode(out.tolist()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
