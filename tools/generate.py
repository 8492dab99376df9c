"""Sample text from a megagpt checkpoint: a pretraining --save dir (any ZeRO stage, tensor- or
pipeline-parallel), a consolidated checkpoint or an HF transformers dir.

Model config, weights and tokenizer come from ``megagpt.checkpoint.load_model`` (for a DeepSpeed
dir its newest complete tag unless --tag; a tag without the 'complete' marker is refused).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megagpt.errors import MegaGPTError, cli_main  # noqa: E402
from megagpt.envsetup import prepare_deepspeed  # noqa: E402

prepare_deepspeed()   # before deepspeed loads: its per-environment caches


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise MegaGPTError(f"--prompt-ids {text!r}: expected comma-separated token ids") from None


@cli_main
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="pretraining --save directory, consolidated checkpoint or HF transformers dir")
    p.add_argument("--tag", help="DeepSpeed checkpoints: global_stepN (default: the newest complete tag)")
    p.add_argument("--tokenizer", help="use this tokenizer (sentencepiece .model or GPT-2 BPE dir) instead of the "
                                       "checkpoint's own; needed for older checkpoints whose tokenizer file has moved")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--prompt-ids", action="append", default=[], metavar="IDS",
                   help="a prompt as comma-separated token ids, e.g. 2,40,41 (repeatable): exact ids, such as a "
                        "leading bos, that no text encodes to")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to sample after each prompt (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest token set with probability >= p")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix each step (slower; for checking)")
    a = p.parse_args(argv)

    import torch

    from megagpt.checkpoint import load_model
    from megagpt.model import generate

    prompts = list(a.prompt)
    if a.prompt_file:
        if not os.path.isfile(a.prompt_file):
            raise MegaGPTError(f"{a.prompt_file}: prompt file not found")
        prompts += [line.rstrip("\n") for line in open(a.prompt_file) if line.strip()]
    prompts += [_ids(text) for text in a.prompt_ids]
    if a.max_new_tokens < 1:
        raise MegaGPTError(f"--max-new-tokens {a.max_new_tokens}: must be >= 1")
    if not prompts:
        raise MegaGPTError("no prompt: pass --prompt TEXT (repeatable), --prompt-file FILE or --prompt-ids IDS")
    model, tok, meta = load_model(a.checkpoint, tag=a.tag, tokenizer=a.tokenizer)
    if tok is None:
        raise MegaGPTError(f"{a.checkpoint}: the checkpoint holds no tokenizer; pass --tokenizer PATH")
    label = meta["tag"] or os.path.basename(os.path.normpath(a.checkpoint))
    gen = torch.Generator().manual_seed(a.seed)
    for i, text in enumerate(prompts):
        ids = text if isinstance(text, list) else tok.encode(text)
        if tok.bos_id is not None and not ids:
            ids = [tok.bos_id]
        budget = min(a.max_new_tokens, model.cfg.max_seq_len - len(ids))
        if budget < 1:
            raise MegaGPTError(f"prompt {i + 1} is {len(ids)} tokens: no room for a new token within the model's "
                               f"max_seq_len={model.cfg.max_seq_len}")
        if any(not 0 <= t < model.cfg.vocab_size for t in ids):
            raise MegaGPTError(f"prompt {i + 1}: token ids must be in 0..{model.cfg.vocab_size - 1}")
        out = generate(model, ids, budget, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                       eos_id=tok.eos_id, use_kv_cache=not a.no_kv_cache, generator=gen)
        print(f"=== [{label}] prompt {i + 1}: {text!r}")
        print(tok.decode(out.tolist()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
