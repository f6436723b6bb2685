#!/usr/bin/env bash
# Interleaved A/B of `bench engine` (ours only) between a base commit and this tree, plus
# this tree with int8 weights: each round runs each variant in a fresh process, one after
# another, so a burst of load on a shared machine hits all of them.
# usage: bench/engine_ab.sh BASE_COMMIT MODEL_DIR ROUNDS [bench engine args...]
set -euo pipefail
base_commit=$1 model=$2 rounds=$3
shift 3
repo=$(cd "$(dirname "$0")/.." && pwd)
py="$repo/.venv/bin/python"
if [ -n "${AB_BASE_DIR:-}" ]; then  # an extracted copy of the base commit from an earlier run
  base_dir=$AB_BASE_DIR
else
  base_dir=$(mktemp -d /tmp/c2c-engine-ab-XXXXXX)
  trap 'rm -rf "$base_dir"' EXIT
  git -C "$repo" archive "$base_commit" | tar -x -C "$base_dir"
fi
echo "# base $base_commit in $base_dir (compiling its kernels once first)"
(cd "$base_dir" && "$py" -m c2c_kernels.precompile | tail -1)
run() {  # name dir extra-args...
  local name=$1 dir=$2
  shift 2
  echo "## $name, load $(cut -d' ' -f1-3 /proc/loadavg)"
  (cd "$dir" && "$py" -c 'import sys; from services.cli import main; sys.exit(main(sys.argv[1:]))' \
     bench engine --model "$model" --no-hf "$@" 2>/dev/null | grep -E '^ +[0-9]+ ')
}
for round in $(seq 1 "$rounds"); do
  echo "# round $round"
  run "base $base_commit" "$base_dir" "$@"
  run "this tree" "$repo" --rounds 1 "$@"
  run "this tree, --quantize int8" "$repo" --rounds 1 --quantize int8 "$@"
done
echo "# load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
