#!/usr/bin/env bash
# The GPU machine's one prepared command: the carried wheels installed, the GPU shown, bench/gpu_check.py run, and its
# results copied into the folder the machine returns as they are written (a cut or killed run keeps what it measured).
#
#   bash bench/gpu_device.sh "$OUT" [gpu_check.py flags]     # on the GPU machine, in the repository root (.whl carried)
#   bash bench/gpu_device.sh --dry-run DIR [flags]           # here, on CPU: the same steps with gpu_check.py --dry-run
#
# DIR receives at most 8 plain files, none in a subfolder: <item>.md (5), summary.md, logs.tar.gz (the items' logs,
# nvidia-smi's and pip's output) and device.log (this script's console, written as it runs). gpu_check.py's own folder
# and the compile cache stay outside DIR, under $GPU_CHECK_WORK (default /tmp/meloformer-gpu-check; with --dry-run, a new temp
# folder, so a rehearsal returns its own items only): a rerun on the
# same machine while it is still held loads what the first run compiled, and its summary.md holds the items of both.
# The whole check is bounded by gpu_check.py (540 s on the GPU) and, should it hang, by `timeout` 40 s later.
set -uo pipefail
cd "$(dirname "$0")/.."
dry=(); if [ "${1:-}" = --dry-run ]; then dry=(--dry-run); shift; fi
if [ $# -lt 1 ] || [ -z "$1" ] || [[ "$1" == -* ]]; then
  echo "usage: bash bench/gpu_device.sh [--dry-run] EXPORT_DIR [gpu_check.py flags]" >&2; exit 2
fi
export_dir=$1; shift
if ! mkdir -p "$export_dir" || ! [ -w "$export_dir" ]; then echo "gpu_device.sh: $export_dir: not a folder it can write to" >&2; exit 2; fi
export_dir=$(cd "$export_dir" && pwd)
work=${GPU_CHECK_WORK:-/tmp/meloformer-gpu-check}
if [ ${#dry[@]} -gt 0 ] && [ -z "${GPU_CHECK_WORK:-}" ]; then work=$(mktemp -d); fi   # a rehearsal: its own folder, no other run's items
results=$work/results cache=$work/compile_cache site=$work/site
PY=${PYTHON:-python3}
limit=$(( ${#dry[@]} ? 640 : 580 ))

run() {
  mkdir -p "$results/logs" "$cache" || { echo "gpu_device.sh: $work: cannot make the work folder"; return 2; }
  echo "== $(date '+%Y-%m-%d %H:%M:%S') bench/gpu_device.sh ${dry[*]} $export_dir; work folder $work; $($PY --version 2>&1) ($(command -v "$PY"))"
  echo "== wheels"
  if compgen -G '.whl/*.whl' > /dev/null; then
    ls .whl
    if [ "$($PY -c 'import sys; print("%d.%d" % sys.version_info[:2])')" = 3.12 ]; then
      if ! $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl > "$results/logs/pip.txt" 2>&1; then
        cat "$results/logs/pip.txt"; echo "gpu_device.sh: the wheels in .whl did not install"; return 2
      fi
      export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
      echo "installed into $site"
    else          # a rehearsal on another Python: the wheels must install for 3.12; this Python keeps its own packages
      chk=$(mktemp -d)
      if ! $PY -m pip install -q --no-index --no-deps --no-compile --target "$chk" --python-version 3.12 --implementation cp \
             --only-binary=:all: --platform manylinux_2_28_x86_64 .whl/*.whl > "$results/logs/pip.txt" 2>&1; then
        cat "$results/logs/pip.txt"; echo "gpu_device.sh: the wheels in .whl do not install for Python 3.12"; rm -rf "$chk"; return 2
      fi
      echo "not Python 3.12 here: the wheels install for 3.12 ($(ls "$chk" | grep -c dist-info) packages), and are not used"; rm -rf "$chk"
    fi
  else
    echo "no .whl/: the packages meloformer needs must be installed already (bash bench/fetch_wheels.sh makes .whl/)"
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  echo "== nvidia-smi"
  if command -v nvidia-smi > /dev/null; then nvidia-smi 2>&1 | tee "$results/logs/nvidia-smi.txt"
  else echo "nvidia-smi: not here" | tee "$results/logs/nvidia-smi.txt"; fi
  echo "== bench/gpu_check.py"
  PYTHONUNBUFFERED=1 timeout -k 15 "$limit" $PY bench/gpu_check.py "${dry[@]}" --out_dir "$results" --cache_dir "$cache" \
    --export "$export_dir" "$@"
  rc=$?
  [ $rc -eq 124 ] && echo "gpu_device.sh: gpu_check.py still running after $limit s: stopped"
  echo "== results (exit $rc)"
  $PY bench/gpu_check.py --summarize "$results" --export "$export_dir" > /dev/null      # once more, whatever happened above
  return $rc
}

run "$@" 2>&1 | tee -a "$export_dir/device.log"
rc=${PIPESTATUS[0]}
ls -l "$export_dir"
exit "$rc"
