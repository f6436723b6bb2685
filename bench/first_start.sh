#!/usr/bin/env bash
# First start as a new user meets it: a fresh clone, a fresh HOME (no demo catalog, no
# caches), an empty Numba kernel cache, one core kept busy by another process. Times the
# install (`./dev install`) and then `./dev up` until the first completion answers.
# Usage: bash bench/first_start.sh [OUT]   (default bench/results/first_start.txt)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$repo/bench/results/first_start.txt}"
work="$(mktemp -d)"
port=18731
git clone -q "$repo" "$work/c2cserve"
cd "$work/c2cserve"
export HOME="$work/home" C2C_VENV="$work/venv"
mkdir -p "$HOME"
python3 -c 'while True: pass' &  # the other core is busy
busy=$!
cleanup() { kill "$busy" 2>/dev/null || true; [ -n "${up:-}" ] && kill -INT "$up" 2>/dev/null; wait 2>/dev/null || true; }
trap cleanup EXIT
t0=$(date +%s.%N)
./dev install > "$work/install.log" 2>&1
t1=$(date +%s.%N)
./dev up --port "$port" > "$work/up.log" 2>&1 &
up=$!
body='{"model": "demo-llama", "prompt": "Hello", "max_tokens": 8, "temperature": 0}'
until curl -sf "http://127.0.0.1:$port/v1/completions" -H 'Content-Type: application/json' -d "$body" > "$work/answer.json"; do
  kill -0 "$up" 2>/dev/null || { echo "up exited:"; tail -30 "$work/up.log"; exit 1; }
  sleep 1
done
t2=$(date +%s.%N)
{
  echo "\$ bash bench/first_start.sh   (fresh clone, HOME=$HOME, empty kernel cache, a busy loop on one core)"
  echo "machine: $(nproc) cores; load average $(cut -d' ' -f1 /proc/loadavg) at the end"
  printf 'install (./dev install: CPU torch + the project): %.0f s\n' "$(echo "$t1 - $t0" | bc)"
  printf './dev up -> first correct completion: %.0f s (target: within 180 s of the install)\n' "$(echo "$t2 - $t1" | bc)"
  echo "answer: $(head -c 300 "$work/answer.json")"
  echo "what ./dev up printed:"
  grep -v " INFO \| DEBUG " "$work/up.log" | head -40
} | tee "$out"
