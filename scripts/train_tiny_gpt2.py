#!/usr/bin/env python3
"""Trains a small GPT-2 with transformers for a few minutes on local text, to measure what each
weight precision costs on a model with learned weights (no real GPT-2 can be downloaded here).

Text: Python standard-library sources found on this machine (plain English comments and code).
The last files (sorted by path) are held out and written to OUT/heldout.txt for scoring.
Writes OUT/ as a Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json).

  python3 scripts/train_tiny_gpt2.py --out /tmp/tiny-trained --minutes 5
  gpt2rs score --model /tmp/tiny-trained --text-file /tmp/tiny-trained/heldout.txt --dtype int4 --against f32
"""
import argparse, glob, os, shutil, sys, time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER = os.path.join(HERE, "..", "crates", "gpt2rs", "assets", "tokenizer", "tokenizer.json")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=320, help="not a multiple of 256, like gpt2-xl's 1600")
    ap.add_argument("--heads", type=int, default=5)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = GPT2TokenizerFast(tokenizer_file=TOKENIZER)
    files = sorted(glob.glob(f"/usr/lib/python3*/**/*.py", recursive=True))
    if len(files) < 50:
        sys.exit("not enough Python sources under /usr/lib/python3* to train on")
    held = files[-40:]
    train_text = "\n".join(open(f, errors="replace").read() for f in files[:-40][:600])
    held_text = "\n".join(open(f, errors="replace").read() for f in held)[:60_000]
    ids = torch.tensor(tok(train_text)["input_ids"], dtype=torch.long)
    print(f"{len(ids)} training tokens from {min(600, len(files) - 40)} files", flush=True)

    cfg = GPT2Config(n_layer=a.layers, n_embd=a.width, n_head=a.heads, n_positions=256,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    deadline = time.time() + a.minutes * 60
    step = 0
    while time.time() < deadline:
        starts = torch.randint(0, len(ids) - a.seq - 1, (a.batch,))
        x = torch.stack([ids[s:s + a.seq] for s in starts])
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    shutil.copy(TOKENIZER, os.path.join(a.out, "tokenizer.json"))
    with open(os.path.join(a.out, "heldout.txt"), "w") as f:
        f.write(held_text)
    print(f"saved {a.out} after {step} steps, last loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
