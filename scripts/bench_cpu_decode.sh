#!/usr/bin/env bash
# Decode speed of gpt2rs vs transformers on this CPU, side by side and alternating, with the
# machine's read bandwidth measured in the same run (the floor is f32 weight bytes / bandwidth).
# Usage: scripts/bench_cpu_decode.sh [model=gpt2] [rounds=3] [threads=all cores]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-gpt2}; rounds=${2:-3}; threads=${3:-$(nproc)}
cargo build --release -q -p gpt2rs-cli -p gpt2rs --example membw
bin=target/release/gpt2rs
bytes=$($bin info --synthetic "$model" | awk '/parameters:/ {print $2}' | tr -d M)
echo "model $model (${bytes}M params), $threads threads, prompt 5 tokens, 128 new tokens, greedy, f32"
results=$(mktemp); trap 'rm -f "$results"' EXIT
for r in $(seq "$rounds"); do
  bw=$(RAYON_NUM_THREADS=$threads target/release/examples/membw | awk "/read bandwidth/ {print \$3}" | sort -n | sed -n 2p)
  ours=$($bin --threads "$threads" generate --synthetic "$model" --prompt "Hello, my name is" -n 128 \
           --ignore-eos --stats 2>&1 >/dev/null | sed -n 's/.*= \([0-9.]*\) tok\/s.*/\1/p')
  theirs=$(python3 scripts/bench_transformers.py --model "$model" --threads "$threads" --reps 1 --prompt-len 5 \
           | python3 -c 'import json,sys; print(json.load(sys.stdin)["decode_tok_s"])')
  python3 - "$bw" "$ours" "$theirs" "$model" "$results" <<'PY'
import sys
bw, ours, theirs, model = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
shapes = {"gpt2": (12, 768), "gpt2-medium": (24, 1024), "gpt2-large": (36, 1280), "gpt2-xl": (48, 1600), "distilgpt2": (6, 768)}
L, C = shapes[model]
read = 4 * (L * (12 * C * C + 13 * C) + 50257 * C + 2 * C)  # f32 bytes read per decode step
floor = bw * 1e9 / read
print(f"bandwidth {bw:5.1f} GB/s  floor {floor:5.1f} tok/s | gpt2rs {ours:6.1f} tok/s ({ours / floor:4.0%} of floor) | "
      f"transformers {theirs:5.1f} tok/s | gpt2rs / transformers {ours / theirs:4.2f}x")
with open(sys.argv[5], "a") as f:
    print(bw, floor, ours, theirs, ours / floor, ours / theirs, file=f)
PY
done
# The machine drifts between rounds: the medians are the figures to quote.
python3 - "$results" <<'PY'
import statistics, sys
cols = list(zip(*(map(float, l.split()) for l in open(sys.argv[1]))))
bw, floor, ours, theirs, frac, ratio = (statistics.median(c) for c in cols)
print(f"median of {len(cols[0])} rounds: bandwidth {bw:.1f} GB/s, floor {floor:.1f} tok/s, gpt2rs {ours:.1f} tok/s "
      f"({frac:.0%} of floor), transformers {theirs:.1f} tok/s, gpt2rs / transformers {ratio:.2f}x")
PY
