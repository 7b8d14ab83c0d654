#!/usr/bin/env bash
# Does `finetune --max-minutes` keep its budget when the machine slows down mid-run (a shared CPU)?
# Fine-tunes minilm-l6 on rotten_tomatoes with a 1.5-minute budget; 25 s in, two busy-loop processes start
# (one per core on a 2-core machine) and run to the end. Prints the budget, the run's wall time and the
# step counts it fitted. `bash bench/max_minutes.sh [MINUTES] [HOG_AFTER_S]`; about 2 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
MIN="${1:-1.5}"; AFTER="${2:-25}"
OUT=$(mktemp -d /tmp/lmforge-max-minutes-XXXX)
start=$(date +%s.%N)
.venv/bin/lmforge finetune --task classify --model minilm-l6 --train rotten_tomatoes --out "$OUT/run" \
  --max-minutes "$MIN" --max-eval-examples 300 --no-progress > "$OUT/log" 2>&1 &
run=$!
sleep "$AFTER"
hogs=()
for _ in 1 2; do .venv/bin/python -c "while True: pass" & hogs+=($!); done
wait $run; rc=$?
end=$(date +%s.%N)
kill "${hogs[@]}" 2>/dev/null
grep -E -- "--max-minutes|^step|done in" "$OUT/log"
.venv/bin/python -c "print(f'exit {$rc}; budget {float($MIN) * 60:.0f} s, wall {$end - $start:.0f} s (model load and test evaluation included)')"
