#!/usr/bin/env python3
"""Decode speed of Hugging Face transformers on the CPU, for side-by-side runs with gpt2rs.

Random weights of the exact shape of a GPT-2 preset (no download), f32, greedy, a fixed
prompt length and number of new tokens. Prints one JSON line.
Decode tok/s = (new_tokens - 1) / (time(generate new_tokens) - time(generate 1 token)).
"""
import argparse, json, time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
          "gpt2-xl": (48, 25, 1600), "distilgpt2": (6, 12, 768)}

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2", choices=SHAPES)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    n_layer, n_head, n_embd = SHAPES[a.model]
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, a.prompt_len))
    mask = torch.ones_like(ids)

    def run(n):
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=cfg.eos_token_id)
        return time.perf_counter() - t

    run(4)  # warm-up
    best = None
    for _ in range(a.reps):
        first = run(1)
        full = run(a.new_tokens)
        tps = (a.new_tokens - 1) / (full - first)
        best = tps if best is None else max(best, tps)
    print(json.dumps({"engine": "transformers", "version": __import__("transformers").__version__,
                      "torch": torch.__version__, "model": a.model, "threads": a.threads,
                      "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                      "decode_tok_s": round(best, 2)}), flush=True)

if __name__ == "__main__":
    main()
