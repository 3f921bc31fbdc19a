#!/usr/bin/env bash
# Run every benchmark script in bench/ (or the ones named), then refresh bench/README.md's figures from bench/results/.
#
#   bash bench/run_all.sh                  # all of them, in order
#   bash bench/run_all.sh train generate   # only these (names without .py)
#   bash bench/run_all.sh --list           # what would run, and what would be skipped for missing packages
#
# A script whose optional packages are missing is skipped with a message; a failing script is reported and the
# others still run. Each script writes its own bench/results/<name>.md; logs go to $BENCH_LOGS (default: a temp dir).
# Extra arguments for one script: e.g. TRAIN_ARGS="--quick" ATTENTION_ARGS="--quick" bash bench/run_all.sh
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
LOGS=${BENCH_LOGS:-$(mktemp -d -t meloformer-bench-XXXX)}
mkdir -p "$LOGS"

# optional python modules a script needs beyond meloformer's own dependencies
declare -A NEEDS=([tokenizer]="miditok" [metrics_vs_muspy]="muspy")
ORDER=(tokenizer data attention generate metrics_vs_muspy train)   # cheap first; others found in bench/ run after these
LONG=(soak)   # hours at full size: run only when named (bash bench/run_all.sh soak; SOAK_ARGS="--files 500 --steps 600" to scale down)

list=0; wanted=()
for a in "$@"; do
  if [[ $a == --list ]]; then list=1; else wanted+=("${a%.py}"); fi
done
if (( ${#wanted[@]} == 0 )); then
  wanted=("${ORDER[@]}")
  for f in bench/*.py; do
    n=$(basename "$f" .py)
    # not benchmarks of their own: the summary, the shared helpers, and the GPU check (needs CUDA; run it by name); LONG ones only by name
    [[ $n == summarize || $n == _* || $n == gpu_check || " ${wanted[*]} ${LONG[*]} " == *" $n "* ]] || wanted+=("$n")
  done
fi

declare -a ran=() skipped=() failed=()
for n in "${wanted[@]}"; do
  f=bench/$n.py
  if [[ ! -f $f ]]; then echo "== $n: no such script ($f)"; failed+=("$n"); continue; fi
  missing=()
  for mod in ${NEEDS[$n]:-}; do $PY -c "import $mod" 2>/dev/null || missing+=("$mod"); done
  if (( ${#missing[@]} )); then
    echo "== $n: skipped, missing ${missing[*]} (pip install -e \".[bench]\"; muspy: pip install muspy)"
    skipped+=("$n"); continue
  fi
  var=$(echo "$n" | tr '[:lower:]' '[:upper:]')_ARGS
  args=${!var:-}
  if (( list )); then echo "== $n: would run $PY $f $args"; continue; fi
  echo "== $n: $PY $f $args  (log: $LOGS/$n.log)"
  start=$SECONDS
  # shellcheck disable=SC2086
  $PY "$f" $args 2>&1 | tee "$LOGS/$n.log"; rc=${PIPESTATUS[0]}
  if (( rc == 0 )); then ran+=("$n ($((SECONDS - start)) s)")
  else echo "== $n: FAILED (exit $rc), see $LOGS/$n.log"; failed+=("$n"); fi
done
(( list )) && exit 0

echo
echo "ran: ${ran[*]:-none}"
echo "skipped: ${skipped[*]:-none}"
echo "failed: ${failed[*]:-none}"
$PY bench/summarize.py
(( ${#failed[@]} == 0 ))
