#!/usr/bin/env bash
# What each weight precision costs, against f32 on the same model and text: perplexity, mean and
# max KL divergence of next-token distributions, top-1 agreement (`gpt2rs score --against f32`).
# Usage: scripts/quality.sh MODEL_DIR TEXT_FILE [max_length] [stride]
set -euo pipefail
cd "$(dirname "$0")/.."
model=$1; text=$2; window=${3:-}; stride=${4:-}
cargo build --release -q -p gpt2rs-cli
extra=()
[ -n "$window" ] && extra+=(--max-length "$window")
[ -n "$stride" ] && extra+=(--stride "$stride")
echo "| dtype | perplexity | vs f32 | mean KL (nats) | max KL | top-1 agreement |"
echo "|---|---:|---:|---:|---:|---:|"
row=$(mktemp); trap 'rm -f "$row"' EXIT
cat > "$row" <<'PY'
import json, sys
r = json.load(sys.stdin)
a = r["against"]
d = a["divergence"]
if sys.argv[1] == "f16":
    print("| f32 | %.4f | | | | |" % a["perplexity"])
print("| %s | %.4f | %+.2f%% | %.2e | %.2e | %.2f%% |" % (
    r["weights"], r["perplexity"], (r["perplexity"] / a["perplexity"] - 1) * 100,
    d["mean_kl"], d["max_kl"], d["top1_agreement"] * 100))
PY
for d in f16 bf16 int8 int4; do
  target/release/gpt2rs score --model "$model" --text-file "$text" --dtype "$d" --against f32 --json \
      "${extra[@]}" 2>/dev/null | python3 "$row" "$d"
done
