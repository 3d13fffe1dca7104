#!/usr/bin/env python3
"""Hugging Face transformers' speed on the same configurations as `gpt2rs bench --compare transformers`.

Random weights of the exact shape of a GPT-2 preset (no download) or a local checkpoint directory,
greedy `generate`, a batch of
equal-length random prompts (so no padding), f32 on the CPU (or fp16 on CUDA with --device cuda).
Prints one JSON line:
  ttft_ms       time of generate(max_new_tokens=1): the prefill plus one token
  prefill_tok_s batch * prompt_len / ttft
  decode_tok_s  batch * (new_tokens - 1) / (time(generate(new_tokens)) - ttft)
Each figure is the median of --reps runs after a warm-up.
"""
import argparse, json, os, statistics, sys, time

import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
          "gpt2-xl": (48, 25, 1600), "distilgpt2": (6, 12, 768)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2",
                    help="a preset (random weights): " + ", ".join(SHAPES) + "; or a checkpoint directory")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = torch.float32 if a.device == "cpu" else torch.float16
    if a.model in SHAPES:
        n_layer, n_head, n_embd = SHAPES[a.model]
        cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        model = GPT2LMHeadModel(cfg)
    elif os.path.isdir(a.model):
        model = GPT2LMHeadModel.from_pretrained(a.model)
        cfg = model.config
    else:
        sys.exit(f"unknown model {a.model!r}: a preset ({', '.join(SHAPES)}) or a checkpoint directory")
    model = model.to(a.device, dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.prompt_len), device=a.device)
    mask = torch.ones_like(ids)

    def run(n):
        if a.device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                           min_new_tokens=n, pad_token_id=cfg.eos_token_id)
        if a.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run(2)  # warm-up
    ttft, decode = [], []
    for _ in range(a.reps):
        first = run(1)
        full = run(a.new_tokens)
        ttft.append(first)
        decode.append(a.batch * (a.new_tokens - 1) / max(full - first, 1e-9))
    t = statistics.median(ttft)
    print(json.dumps({
        "engine": f"transformers {transformers.__version__} (torch {torch.__version__})",
        "model": a.model, "device": a.device, "threads": torch.get_num_threads(), "batch": a.batch,
        "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
        "ttft_ms": round(t * 1e3, 3), "prefill_tok_s": round(a.batch * a.prompt_len / t, 2),
        "decode_tok_s": round(statistics.median(decode), 2)}), flush=True)


if __name__ == "__main__":
    main()
