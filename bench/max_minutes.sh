#!/usr/bin/env bash
# Does --max-minutes keep its budget when the machine slows down mid-run (a shared CPU)?
#   bash bench/max_minutes.sh [finetune|pretrain] [MINUTES] [HOG_AFTER_S]        about 2 minutes each
# finetune: minilm-l6 on rotten_tomatoes; pretrain: the `small` preset on Shakespeare. A 1.5-minute budget;
# 25 s in, two busy-loop processes start (one per core on a 2-core machine) and run to the end. Prints the
# step counts the run fitted, its last evaluation and its wall time against the budget.
set -uo pipefail
cd "$(dirname "$0")/.."
VERB="${1:-finetune}"; MIN="${2:-1.5}"; AFTER="${3:-25}"
OUT=$(mktemp -d /tmp/lmforge-max-minutes-XXXX)
case "$VERB" in
  finetune) ARGS=(finetune --task classify --model minilm-l6 --train rotten_tomatoes --max-eval-examples 300) ;;
  pretrain) ARGS=(pretrain --data shakespeare --size small) ;;
  *) echo "usage: $0 [finetune|pretrain] [MINUTES] [HOG_AFTER_S]" >&2; exit 2 ;;
esac
start=$(date +%s.%N)
.venv/bin/lmforge "${ARGS[@]}" --out "$OUT/run" --max-minutes "$MIN" --no-progress > "$OUT/log" 2>&1 &
run=$!
sleep "$AFTER"
hogs=()
for _ in 1 2; do .venv/bin/python -c "while True: pass" & hogs+=($!); done
wait $run; rc=$?
end=$(date +%s.%N)
kill "${hogs[@]}" 2>/dev/null
grep -E -- "max-minutes|minutes is about|budget|^step|done in" "$OUT/log" | tail -6
.venv/bin/python -c "print(f'$VERB: exit {$rc}; budget {float($MIN) * 60:.0f} s, wall {$end - $start:.0f} s (loading and final evaluation included)')"
