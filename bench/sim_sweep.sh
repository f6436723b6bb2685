#!/usr/bin/env bash
# c2cserve sim on other seeds and smaller clusters, side by side with the baselines in each
# run (the main table is `c2cserve sim --out bench/results/sim/main`). Prints one markdown
# table of cold-start TTFT and SLO attainment per configuration.
# usage: bash bench/sim_sweep.sh [out.md]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/sim/sweep.md}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
configs=(
  "--gpus 100 --models 500 --duration-s 1800 --rate 40 --seed 1"
  "--gpus 100 --models 500 --duration-s 1800 --rate 40 --seed 2"
  "--gpus 50 --models 250 --duration-s 1800 --rate 20 --seed 0"
  "--gpus 20 --models 100 --duration-s 900 --rate 8 --seed 0"
  "--gpus 20 --models 100 --duration-s 900 --rate 8 --seed 1"
  "--gpus 20 --models 100 --duration-s 900 --rate 8 --seed 2"
  "--gpus 10 --models 50 --duration-s 900 --rate 4 --seed 0"
)
{
  echo "# c2cserve sim: other seeds and smaller clusters"
  echo
  echo "Command: \`bash bench/sim_sweep.sh\` ($(date -u +%Y-%m-%d), load average $(cut -d' ' -f1-3 /proc/loadavg))."
  echo "Each row is one \`c2cserve sim CONFIG --no-search --skip-no-contention --systems c2cserve,serverlessllm,timeshare --json\` run;"
  echo "baseline loader 375 GB/s, zero init (the generous baseline). Cold-start TTFT p50 / p99 in s; ratio = baseline / c2cserve."
  echo
  echo "| config | dense c2c | dense sllm | dense ratio | moe c2c | moe sllm | moe ratio | attainment c2c / sllm / timeshare |"
  echo "|---|---|---|---|---|---|---|---|"
} > "$tmp/table.md"
for config in "${configs[@]}"; do
  # shellcheck disable=SC2086
  .venv/bin/c2cserve sim $config --no-search --skip-no-contention --systems c2cserve,serverlessllm,timeshare \
      --json --no-progress 2>/dev/null > "$tmp/run.json"
  .venv/bin/python - "$config" "$tmp/run.json" >> "$tmp/table.md" <<'PY'
import json, sys
config, path = sys.argv[1], sys.argv[2]
runs = json.load(open(path))["runs"]
c, s, t = runs["c2cserve"], runs["serverlessllm"], runs["timeshare"]
def pair(r, k):
    if r[f"cold_{k}_p50_s"] is None:
        return "none"
    return f"{r[f'cold_{k}_p50_s']:.3f} / {r[f'cold_{k}_p99_s']:.3f} (n={r[f'cold_{k}_count']})"
def ratio(k):
    if c[f"cold_{k}_p50_s"] is None or s[f"cold_{k}_p50_s"] is None:
        return "n/a"
    return f"{s[f'cold_{k}_p50_s'] / c[f'cold_{k}_p50_s']:.2f}x / {s[f'cold_{k}_p99_s'] / c[f'cold_{k}_p99_s']:.2f}x"
print(f"| `{config}` | {pair(c, 'dense')} | {pair(s, 'dense')} | {ratio('dense')} | {pair(c, 'moe')} | {pair(s, 'moe')} "
      f"| {ratio('moe')} | {c['slo_attainment']:.3f} / {s['slo_attainment']:.3f} / {t['slo_attainment']:.3f} |")
PY
done
cp "$tmp/table.md" "$out"
cat "$out"
