#!/usr/bin/env bash
# Quality runs behind docs/benchmarks.md (fine-tuning issue): test-set metrics of the packaged models on the
# built-in data. Each run writes runs/quality/<name>/metrics.json; this script copies the summaries into
# docs/results/. About 50 minutes on 2 CPU cores; pass names to run a subset, e.g. `bash bench/quality.sh qa`.
set -euo pipefail
cd "$(dirname "$0")/.."
LM=.venv/bin/lmforge
OUT=runs/quality
mkdir -p "$OUT" docs/results
# every run here starts afresh: finetune refuses a folder holding an earlier run's checkpoints
for name in minilm_rt minilm_zh smollm_rt_lora qa translate; do
  if [[ " ${*:-minilm_zh qa smollm_rt_lora translate} " == *" $name "* ]]; then rm -rf "${OUT:?}/$name"; fi
done
# minilm_rt (3 epochs) is optional here: bench/finetune_classify.py already measures minilm-l6 on rotten_tomatoes.
ALL="${*:-minilm_zh qa smollm_rt_lora translate}"

if [[ " $ALL " == *" minilm_rt "* ]]; then
  $LM finetune --task classify --model minilm-l6 --train rotten_tomatoes --out $OUT/minilm_rt --epochs 3 --no-progress
  cp $OUT/minilm_rt/metrics.json docs/results/minilm_rotten_tomatoes.json
fi
if [[ " $ALL " == *" minilm_zh "* ]]; then
  $LM finetune --task classify --model minilm-l6 --train chinese_reviews --out $OUT/minilm_zh --epochs 1 --no-progress
  cp $OUT/minilm_zh/metrics.json docs/results/minilm_chinese_reviews.json
fi
if [[ " $ALL " == *" smollm_rt_lora "* ]]; then
  $LM finetune --task classify --model smollm2-135m --train rotten_tomatoes --out $OUT/smollm_rt_lora --lora \
    --max-minutes 6 --batch-size 16 --no-progress
  cp $OUT/smollm_rt_lora/metrics.json docs/results/smollm2_lora_rotten_tomatoes.json
fi
if [[ " $ALL " == *" qa "* ]]; then
  $LM finetune --task qa --model minilm-l6 --train lmforge_qa --out $OUT/qa --epochs 15 --no-progress
  cp $OUT/qa/metrics.json docs/results/minilm_lmforge_qa.json
fi
if [[ " $ALL " == *" translate "* ]]; then
  # Zero-shot first (the same prompt the fine-tuned model gets), then LoRA on 2,000 training verses.
  $LM evaluate --model smollm2-135m --task translate --data bible_en_es:test --batch-size 16 --max-new-tokens 96 \
    --predictions $OUT/translate_zero_shot_predictions.jsonl > docs/results/smollm2_en_es_zero_shot.json
  $LM finetune --task translate --model smollm2-135m --train bible_en_es --out $OUT/translate --lora \
    --max-train-examples 2000 --epochs 1 --batch-size 16 --max-new-tokens 96 --no-progress
  cp $OUT/translate/metrics.json docs/results/smollm2_lora_en_es.json
fi
