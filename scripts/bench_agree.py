#!/usr/bin/env python3
"""Do two `gpt2rs bench --json` reports of the same command agree within their printed spread?

    gpt2rs bench ... --json > a.json; gpt2rs bench ... --json > b.json
    python3 scripts/bench_agree.py a.json b.json

For each row measured in both and each figure (prefill tok/s, TTFT, decode tok/s), the two
medians agree when their "±" intervals overlap: |a - b| <= spread_a * a + spread_b * b.
Prints one line per figure and exits 1 when any disagree.
"""
import json
import sys

FIGURES = ["prefill_tok_s", "ttft_ms", "decode_tok_s"]


def key(row):
    return (row["backend"], row["model"], row["dtype"], row["batch"], row["prompt_len"])


def spread(stat):
    half = (stat["max"] - stat["min"]) / 2 / stat["median"] if stat["median"] else 0.0
    return half + stat.get("drift", 0.0)


def main(a_path, b_path):
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    if a["header"]["command"].split()[1:] != b["header"]["command"].split()[1:]:
        print("note: the two reports ran different commands")
    rows_b = {key(r): r for r in b["rows"]}
    checked = failed = 0
    for ra in a["rows"]:
        rb = rows_b.get(key(ra))
        if rb is None:
            continue
        for f in FIGURES:
            sa, sb = ra.get(f), rb.get(f)
            if not sa or not sb:
                continue
            ma, mb = sa["median"], sb["median"]
            allowed = spread(sa) * ma + spread(sb) * mb
            ok = abs(ma - mb) <= allowed
            checked += 1
            failed += not ok
            label = " ".join(str(x) for x in key(ra))
            moved = (mb - ma) / ma * 100 if ma else 0.0
            print(
                f"{'ok  ' if ok else 'DIFF'} {label:<40} {f:<14} {ma:>10.4g} ± {spread(sa)*100:4.1f}%"
                f"  {mb:>10.4g} ± {spread(sb)*100:4.1f}%  moved {moved:+.1f}%"
            )
    print(f"{checked - failed} of {checked} figures agree within their printed spread")
    return 1 if failed or not checked else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
