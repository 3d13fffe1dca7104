#!/usr/bin/env python3
"""Generate the gpt2rs test fixtures under tests/fixtures/ with Hugging Face transformers as reference.

Run from the repository root:

    python3 scripts/make_fixtures.py

Needs torch, transformers and safetensors (CPU only, no network). Deterministic: every random draw
comes from a fixed seed, computation is float32, eager attention, 2 threads. Re-running overwrites
tests/fixtures/{models,expected,text/sample.txt,tokenizer_cases.json,README.md}.
"""

import copy
import json
import math
import os
import shutil
import sys

import torch

torch.set_num_threads(2)
torch.set_default_dtype(torch.float32)
torch.use_deterministic_algorithms(True)

import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
MODELS = os.path.join(FIX, "models")
EXPECTED = os.path.join(FIX, "expected")
TEXT = os.path.join(FIX, "text")
TOKENIZER_FILE = os.path.join(ROOT, "crates", "gpt2rs", "assets", "tokenizer", "tokenizer.json")

MAX_NEW_TOKENS = 20
LN_BIAS_STD = 0.2
BIAS_STD = 0.2

# ---------------------------------------------------------------------------------------------
# Model variants
# ---------------------------------------------------------------------------------------------
# Init scales (tuned by hand so the models are far from uniform but not saturated):
#   wte / untied lm_head       : normal(0, wte_std);  wpe : normal(0, wpe_std)
#   attn.c_attn.weight          : normal(0, attn_gain / sqrt(n_embd))
#   attn.c_proj.weight          : normal(0, proj_gain / sqrt(n_embd))
#   mlp.c_fc.weight             : normal(0, fc_gain / sqrt(n_embd))
#   mlp.c_proj.weight           : normal(0, proj_gain / sqrt(n_inner))
#   every Linear/Conv1D bias    : normal(0, BIAS_STD)
#   LayerNorm weight            : uniform[0.5, 1.5];  LayerNorm bias : normal(0, LN_BIAS_STD)
TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=384, n_positions=128)
INIT_TINY = dict(wte_std=0.4, wpe_std=1.0, attn_gain=3.0, fc_gain=1.0, proj_gain=1.0)

VARIANTS = [
    # name, seed, config kwargs, init, stored dtype, save kind
    dict(name="tiny", seed=1001, cfg=dict(TINY), init=INIT_TINY, dtype="float32", save="hf"),
    dict(name="odd-heads", seed=1002,
         cfg=dict(n_layer=3, n_embd=80, n_head=5, n_inner=200, vocab_size=333, n_positions=96),
         init=dict(wte_std=0.42, wpe_std=1.0, attn_gain=3.0, fc_gain=1.0, proj_gain=1.0), dtype="float32", save="hf"),
    dict(name="distil-like", seed=1003,
         cfg=dict(n_layer=6, n_embd=48, n_head=3, vocab_size=512, n_positions=128),
         init=dict(wte_std=0.58, wpe_std=1.0, attn_gain=3.0, fc_gain=1.0, proj_gain=1.0), dtype="float32", save="hf"),
    dict(name="f16-stored", seed=1004, cfg=dict(TINY), init=INIT_TINY, dtype="float16", save="hf"),
    dict(name="bf16-stored", seed=1005, cfg=dict(TINY), init=INIT_TINY, dtype="bfloat16", save="hf"),
    dict(name="untied-head", seed=1006, cfg=dict(TINY, tie_word_embeddings=False), init=INIT_TINY,
         dtype="float32", save="hf"),
    dict(name="legacy-layout", seed=1007, cfg=dict(TINY), init=INIT_TINY, dtype="float32", save="legacy"),
    dict(name="sharded", seed=1008, cfg=dict(TINY), init=INIT_TINY, dtype="float32", save="sharded"),
    dict(name="full-vocab", seed=1009,
         cfg=dict(n_layer=2, n_embd=16, n_head=2, vocab_size=50257, n_positions=256),
         init=dict(wte_std=1.2, wpe_std=1.0, attn_gain=3.0, fc_gain=1.0, proj_gain=1.0), dtype="float16", save="hf"),
]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

SAMPLE_TEXT = """\
The lighthouse keeper had not spoken to anyone in eleven days when the supply boat finally rounded the
headland. She watched it from the gallery, one hand on the cold iron rail, counting the seconds between
the swells the way her father had taught her. The sea was grey and patient. Gulls argued over something
on the rocks below, and somewhere inside the tower a loose shutter kept time with the wind.

Most people imagine that solitude is quiet. It is not. A house by the water is full of small noises:
the tick of cooling metal, the sigh of the kettle, the radio muttering shipping forecasts in a voice that
never changes. "Viking, North Utsire, South Utsire: southwesterly five to seven, occasionally gale eight
later. Rain, then showers. Moderate or poor." She could recite them in her sleep, and sometimes did.

When the boat tied up, the young man who stepped onto the jetty was not the usual skipper. He carried a
clipboard, a waterproof satchel, and the expression of someone who had been seasick for most of the
crossing. "Ms. Okafor?" he asked. "I'm from the Board. We're automating the light."

She had known this was coming for years; everyone had. Still, hearing it said aloud on her own jetty,
with the wind snatching at the pages of his clipboard, felt like being told the ending of a book she had
not finished reading. She invited him in, because that is what you do, and made tea, because that is
also what you do, and listened while he explained the schedule: new lamps in March, remote monitoring
by June, the keeper's cottage to be "repurposed" by the end of the year.

"What will you do?" he asked, when the tea was gone. She thought about it honestly. "I'll learn to
sleep through the night," she said. "Then I expect I'll miss it."

Notes from the logbook, transcribed:
  1998-03-14  wind SW 6, vis 12 km, lamp lit 18:42, extinguished 06:55
  1998-03-15  wind W 7-8, vis 4 km, fog signal 02:10-04:35 (2h25m)
  Fuel remaining: 1,250 L (approx. 31% of capacity); spare bulbs x 14

A small script the technician left behind:
    def lamp_hours(lit, out):
        return (out - lit) % 24  # hours, wraps past midnight

Unicode odds and ends: café, naïve, Zürich, São Paulo, 東京, Москва, £12.50, €9.99, 3×4=12, π≈3.14159, 🌊🐟.
"""

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def dumps(obj, indent=0):
    """JSON with one level of indentation per dict, lists of scalars kept on one line."""
    pad, pad1 = " " * indent, " " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad1}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(x, (dict, list)) for x in obj):
        return "[\n" + ",\n".join(pad1 + dumps(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False)


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(obj))
        f.write("\n")


def make_config(cfg, tie=True):
    cfg = dict(cfg)
    v = cfg["vocab_size"]
    cfg.setdefault("tie_word_embeddings", tie)
    return GPT2Config(bos_token_id=v - 1, eos_token_id=v - 1, attn_implementation="eager", **cfg)


def redraw(model, seed, init):
    """Re-draw every parameter (transformers' init leaves biases at 0 and LNs at 1/0)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    e = cfg.n_embd
    inner = cfg.n_inner or 4 * e
    stds = {}
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied lm_head is the same object as wte -> skipped
            if ".ln_" in name or name.startswith("transformer.ln_f"):
                if name.endswith("weight"):
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
                    stds["ln.weight"] = "uniform[0.5,1.5]"
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * LN_BIAS_STD)
                    stds["ln.bias"] = LN_BIAS_STD
                continue
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * BIAS_STD)
                stds["linear.bias"] = BIAS_STD
                continue
            if "wte" in name or name.startswith("lm_head"):
                s, key = init["wte_std"], name.split(".")[-2]
            elif "wpe" in name:
                s, key = init["wpe_std"], "wpe"
            elif "attn.c_attn" in name:
                s, key = init["attn_gain"] / math.sqrt(e), "attn.c_attn"
            elif "attn.c_proj" in name:
                s, key = init["proj_gain"] / math.sqrt(e), "attn.c_proj"
            elif "mlp.c_fc" in name:
                s, key = init["fc_gain"] / math.sqrt(e), "mlp.c_fc"
            elif "mlp.c_proj" in name:
                s, key = init["proj_gain"] / math.sqrt(inner), "mlp.c_proj"
            else:
                raise RuntimeError(f"unexpected parameter {name}")
            p.copy_(torch.randn(p.shape, generator=g) * s)
            stds[key] = round(s, 5)
    return stds


def load_ref(path):
    m, info = GPT2LMHeadModel.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("attn.bias")]
    assert not missing, f"{path}: missing keys {missing}"
    assert not info.get("mismatched_keys"), info
    return m.eval(), info


def legacy_state_dict(model):
    """openai-community/gpt2 model.safetensors layout: no `transformer.` prefix, no lm_head, attn.bias buffers."""
    cfg = model.config
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith("lm_head."):
            continue
        assert k.startswith("transformer."), k
        out[k[len("transformer."):]] = v.detach().clone().contiguous()
    mask = torch.tril(torch.ones(cfg.n_positions, cfg.n_positions, dtype=torch.float32)).view(
        1, 1, cfg.n_positions, cfg.n_positions
    )
    for i in range(cfg.n_layer):
        out[f"h.{i}.attn.bias"] = mask.clone()
    return out


def legacy_config(cfg):
    # Shaped like openai-community/gpt2's own config.json (old-style keys, n_ctx, no dtype).
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": cfg.bos_token_id,
        "embd_pdrop": 0.1,
        "eos_token_id": cfg.eos_token_id,
        "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": cfg.n_positions,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "n_layer": cfg.n_layer,
        "n_positions": cfg.n_positions,
        "resid_pdrop": 0.1,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}},
        "vocab_size": cfg.vocab_size,
    }


def save_variant(v, model, out_dir):
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    kind = v["save"]
    if kind == "legacy":
        save_file(legacy_state_dict(model), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(legacy_config(model.config), f, indent=2)
            f.write("\n")
        return
    m = model
    if v["dtype"] != "float32":
        m = copy.deepcopy(model).to(TORCH_DTYPES[v["dtype"]])
    if kind == "sharded":
        m.save_pretrained(out_dir, max_shard_size="200KB")
    else:
        m.save_pretrained(out_dir)


def tensor_names(out_dir):
    names = {}
    for fn in sorted(os.listdir(out_dir)):
        if fn.endswith(".safetensors"):
            with safetensors.safe_open(os.path.join(out_dir, fn), "pt") as f:
                for k in f.keys():
                    names[k] = (fn, str(f.get_slice(k).get_dtype()), list(f.get_slice(k).get_shape()))
    return names


def greedy_individual(model, prompt, eos):
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=eos, pad_token_id=eos,
    )
    return out[0, len(prompt):].tolist()


def cut_at_eos(seq, eos):
    return seq[: seq.index(eos) + 1] if eos in seq else seq


def greedy_batched(model, prompts, eos):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos,
        pad_token_id=eos,
    )
    return [cut_at_eos(row[width:].tolist(), eos) for row in out]


def greedy_manual(model, prompt, eos):
    """Independent check: full recompute, no cache, explicit positions."""
    seq = list(prompt)
    new = []
    for _ in range(MAX_NEW_TOKENS):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1]
        t = int(logits.argmax())
        new.append(t)
        seq.append(t)
        if t == eos:
            break
    return new


def perplexity(model, ids, max_length, stride, want_token_logprobs=False):
    """Sliding-window protocol of transformers' "Perplexity of fixed-length models" guide."""
    ids_t = torch.tensor([ids])
    seq_len = ids_t.size(1)
    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    scored_nll = 0.0
    scored = 0
    token_logprobs = []
    windows = []
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids_t[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            out = model(input_ids, labels=target_ids)
        loss = out.loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)  # guide: "- batch_size" for the shift
        nll_sum += loss.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        # Exact per-token accounting of what the loss actually averaged over.
        lp = torch.log_softmax(out.logits[0, :-1].double(), dim=-1)
        labels = target_ids[0, 1:]
        sel = (labels != -100).nonzero().flatten()
        tok_lp = lp[sel, labels[sel]]
        assert abs(-tok_lp.mean().item() - loss.item()) < 1e-4, (tok_lp.mean().item(), loss.item())
        scored_nll += -tok_lp.sum().item()
        scored += len(sel)
        token_logprobs.extend(tok_lp.tolist())
        windows.append({"begin": begin_loc, "end": end_loc, "trg_len": trg_len, "loss": loss.item(),
                        "scored": int(len(sel))})
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    avg_nll = nll_sum / n_tokens
    res = {
        "max_length": max_length,
        "stride": stride,
        "n_tokens": n_tokens,
        "mean_nll": avg_nll,
        "ppl": math.exp(avg_nll),
        "n_scored_tokens": scored,
        "scored_mean_nll": scored_nll / scored,
        "scored_ppl": math.exp(scored_nll / scored),
        "windows": windows,
    }
    if want_token_logprobs:
        res["token_logprobs"] = token_logprobs
    return res


def model_stats(model, ids_list, greedy_outputs):
    """Mean top-1 prob / entropy over all next-token distributions of the given sequences."""
    top1, ent, n = 0.0, 0.0, 0
    for ids in ids_list:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        p = logits.softmax(-1)
        top1 += p.max(-1).values.sum().item()
        ent += -(p * p.clamp_min(1e-300).log()).sum(-1).sum().item()
        n += len(ids)
    return {
        "mean_top1_prob": round(top1 / n, 4),
        "mean_entropy_nats": round(ent / n, 4),
        "uniform_entropy_nats": round(math.log(model.config.vocab_size), 4),
        "greedy_distinct_tokens": [len(set(o)) for o in greedy_outputs],
    }


# ---------------------------------------------------------------------------------------------
# Per-model fixtures
# ---------------------------------------------------------------------------------------------


def build_variant(v, tok):
    name = v["name"]
    print(f"== {name}", flush=True)
    torch.manual_seed(v["seed"])
    cfg = make_config(v["cfg"])
    model = GPT2LMHeadModel(cfg).eval()
    stds = redraw(model, v["seed"], v["init"])
    if not cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
        assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)

    out_dir = os.path.join(MODELS, name)
    save_variant(v, model, out_dir)
    names = tensor_names(out_dir)

    # Reference model = what is on disk, loaded back and upcast to f32.
    ref, info = load_ref(out_dir)
    if v["save"] == "legacy":
        # The hand-written layout must load into exactly the in-memory model.
        for k, t in model.state_dict().items():
            assert torch.equal(t, ref.state_dict()[k]), k
    if v["dtype"] != "float32":
        for k, t in model.state_dict().items():
            assert torch.equal(t.to(TORCH_DTYPES[v["dtype"]]).float(), ref.state_dict()[k]), k
    if not cfg.tie_word_embeddings:
        assert "lm_head.weight" in names, "untied model must store lm_head.weight"
        sd = load_file(os.path.join(out_dir, "model.safetensors"))
        assert not torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
        assert not torch.equal(ref.lm_head.weight, ref.transformer.wte.weight)
    else:
        assert "lm_head.weight" not in names
        assert ref.lm_head.weight.data_ptr() == ref.transformer.wte.weight.data_ptr()

    V, P = cfg.vocab_size, cfg.n_positions
    eos = V - 1
    g = torch.Generator().manual_seed(v["seed"] + 7)
    full_vocab = name == "full-vocab"

    # ---- logits cases
    if full_vocab:
        texts = ["Hello", "The quick brown fox jumps over the lazy dog.",
                 "In 1969, Neil Armstrong said: \"That's one small step for man\" — and the world listened."]
        logit_inputs = [tok.encode(t) for t in texts]
    else:
        logit_inputs = [torch.randint(0, V, (n,), generator=g).tolist() for n in (1, 7, 13)]
    tensors = {}
    logits_cases = []
    for k, ids in enumerate(logit_inputs):
        with torch.no_grad():
            logits = ref(torch.tensor([ids])).logits[0].float()
        positions = list(range(len(ids)))[-1:] if full_vocab else list(range(len(ids)))
        tensors[f"logits_{k}"] = logits[positions].contiguous()
        case = {"ids": ids, "tensor": f"logits_{k}", "positions": positions}
        if full_vocab:
            case["text"] = texts[k]
        logits_cases.append(case)

    # ---- greedy
    if full_vocab:
        ptexts = ["Once upon", "The capital of France is a city where",
                  "def fibonacci(n):\n    if n < 2:\n        return n\n    return"]
        prompts = [tok.encode(t) for t in ptexts]
    else:
        prompts = [torch.randint(0, V - 1, (n,), generator=g).tolist() for n in (3, 8, 17)]
    greedy = []
    for i, p in enumerate(prompts):
        out = greedy_individual(ref, p, eos)
        manual = greedy_manual(ref, p, eos)
        assert out == manual, (name, p, out, manual)
        e = {"prompt": p, "max_new_tokens": MAX_NEW_TOKENS, "output": out, "eos_token_id": eos}
        if full_vocab:
            e["prompt_text"] = ptexts[i]
        greedy.append(e)

    batched = greedy_batched(ref, prompts, eos)
    individual = [cut_at_eos(e["output"], eos) for e in greedy]
    batched_greedy = {
        "prompts": prompts, "max_new_tokens": MAX_NEW_TOKENS, "outputs": batched,
        "pad_token_id": eos, "padding_side": "left", "eos_token_id": eos,
        "equal_to_individual": batched == individual,
    }

    # ---- perplexity
    if full_vocab:
        with open(os.path.join(TEXT, "sample.txt"), encoding="utf-8") as f:
            ppl_ids = tok.encode(f.read())
    else:
        ppl_ids = torch.randint(0, V, (int(2.5 * P),), generator=g).tolist()
    ppl_cases = []
    for stride in (P // 2, P):
        r = perplexity(ref, ppl_ids, P, stride, want_token_logprobs=(name == "tiny" and stride == P // 2))
        if full_vocab:
            r = {"text_file": "text/sample.txt", "n_ids": len(ppl_ids), **r}
        else:
            r = {"ids": ppl_ids, **r}
        ppl_cases.append(r)

    stats = model_stats(ref, [c["ids"] for c in logits_cases] + [ppl_ids[:P]], [e["output"] for e in greedy])

    doc = {
        "model": name,
        "model_dir": f"models/{name}",
        "config": {
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
            "n_inner": cfg.n_inner or 4 * cfg.n_embd, "vocab_size": V, "n_positions": P,
            "layer_norm_epsilon": cfg.layer_norm_epsilon, "activation_function": cfg.activation_function,
            "tie_word_embeddings": bool(cfg.tie_word_embeddings), "dtype_stored": v["dtype"],
            "layout": v["save"], "bos_token_id": eos, "eos_token_id": eos,
        },
        "seed": v["seed"],
        "init_stds": stds,
        "stats": stats,
        "logits_file": f"{name}.safetensors",
        "logits_cases": logits_cases,
        "greedy": greedy,
        "batched_greedy": batched_greedy,
        "perplexity": ppl_cases,
    }

    if name == "tiny":
        doc["greedy_eos"] = find_eos_case(ref, V, eos, v["seed"])

    save_file(tensors, os.path.join(EXPECTED, f"{name}.safetensors"), metadata={"format": "pt"})
    write_json(os.path.join(EXPECTED, f"{name}.json"), doc)

    print(f"   stored tensors: {len(names)} e.g. {sorted(names)[:3]} ... files {sorted(set(x[0] for x in names.values()))}")
    print(f"   stats: {stats}")
    print(f"   batched==individual: {batched_greedy['equal_to_individual']}")
    for r in ppl_cases:
        print(f"   ppl stride {r['stride']}: guide n={r['n_tokens']} nll={r['mean_nll']:.5f} ppl={r['ppl']:.3f} | "
              f"scored n={r['n_scored_tokens']} nll={r['scored_mean_nll']:.5f}")
    return {"name": name, "stats": stats, "init": stds, "tensors": names,
            "equal": batched_greedy["equal_to_individual"], "doc": doc}


def find_eos_case(model, V, eos, seed):
    """Search seeded random 5-token prompts for one whose greedy continuation emits eos early."""
    g = torch.Generator().manual_seed(seed + 99)
    cand = torch.randint(0, V - 1, (4000, 5), generator=g)
    seq = cand.clone()
    with torch.no_grad():
        for _ in range(MAX_NEW_TOKENS):
            nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    new = seq[:, 5:]
    hit = (new == eos)
    for i in range(cand.size(0)):
        row = hit[i].nonzero().flatten()
        if len(row) and 2 <= int(row[0]) <= MAX_NEW_TOKENS - 3:
            prompt = cand[i].tolist()
            out = greedy_individual(model, prompt, eos)
            assert out[-1] == eos and len(out) < MAX_NEW_TOKENS, out
            assert out == greedy_manual(model, prompt, eos)
            print(f"   greedy_eos: candidate #{i} stops after {len(out)} tokens")
            return {"prompt": prompt, "max_new_tokens": MAX_NEW_TOKENS, "output": out, "eos_token_id": eos}
    print("   greedy_eos: none found")
    return None


# ---------------------------------------------------------------------------------------------
# Tokenizer cases
# ---------------------------------------------------------------------------------------------

TOKENIZER_STRINGS = [
    "",
    " ",
    "   ",
    "hello",
    " hello",
    "hello ",
    "  hello   world  ",
    "Hello, world!",
    "\thello\tworld\t",
    "line one\r\nline two\r\n",
    "a\n\nb\n\n\n\nc\n",
    "\n",
    " \n \t \r\n  x",
    "don't I'LL we've they're she's it'd you'Re",
    "'s 's's ''' \"quoted\"",
    "0 7 42 123 1234 12345 3.14159 1,000,000 2024-01-31 0x1F",
    "98765432109876543210",
    "!!! ??? ... --- ;;; ~~~ !?!?",
    "(a[b]{c}) <d> @e #f $g %h ^i &j *k",
    "café naïve résumé Zürich São Paulo",
    "東京は日本の首都です。中文测试",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "שלום עולם",
    "Привет, мир!",
    "😀 👍🏽 🇫🇷🇯🇵 👨‍👩‍👧‍👦 ❤️",
    "e\u0301 a\u0308 n\u0303 (combining marks)",
    "zero\u200bwidth\u200bspace and\u00a0nbsp",
    "∀x∈ℝ: x²≥0, ∑ᵢ aᵢ ≤ ∞, √2 ≈ 1.414, α+β=γ",
    "<|endoftext|>",
    "Hello<|endoftext|>World",
    "end of doc. <|endoftext|> Start of next",
    "<|endoftext|><|endoftext|>",
    "<|endoftext",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    "https://example.com/path?query=1&b=2#frag",
    "   \t  leading mixed whitespace before words",
    "trailing mixed whitespace \t \n",
    "ALLCAPS lowercase MiXeD CamelCaseWord snake_case_word",
    "The tokenizer should handle a long paragraph without any trouble at all. It contains several "
    "sentences, some punctuation; a few numbers like 1984 and 2001; and words of varying length, "
    "from 'a' to 'antidisestablishmentarianism'. Repetition repetition repetition is also fine. "
    "Finally, it ends with a question: does everything round-trip exactly?",
]


def tokenizer_cases(tok):
    cases = []
    mismatches = []
    for s in TOKENIZER_STRINGS:
        ids = tok.encode(s, add_special_tokens=False)
        decoded = tok.decode(ids)
        if "<|endoftext|>" in s:
            assert ids.count(50256) == s.count("<|endoftext|>"), (s, ids)
        else:
            assert 50256 not in ids
        if decoded != s:
            mismatches.append(s)
        cases.append({"text": s, "ids": ids, "decoded": decoded})
    write_json(os.path.join(FIX, "tokenizer_cases.json"), cases)
    print(f"tokenizer cases: {len(cases)}, decode mismatches: {mismatches}")
    return cases, mismatches


# ---------------------------------------------------------------------------------------------
# README
# ---------------------------------------------------------------------------------------------


def write_readme(results, n_tok_cases, tok_mismatches):
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, safetensors {safetensors.__version__}, python {sys.version.split()[0]}"
    L = []
    L.append("# gpt2rs test fixtures\n")
    L.append("Generated by `scripts/make_fixtures.py` with Hugging Face transformers as the reference.\n")
    L.append(f"Generated with: {versions} (CPU, `torch.set_num_threads(2)`, float32, `attn_implementation=\"eager\"`).\n")
    L.append("Regenerate from the repository root with `python3 scripts/make_fixtures.py` "
             "(needs `pip install torch transformers safetensors`; no network access, no downloads; deterministic seeds). "
             "Outputs of a different torch/transformers version may differ in the last float bits.\n")
    L.append("## Layout\n")
    L.append("- `models/<name>/`: small random GPT-2 checkpoints (Hugging Face `GPT2LMHeadModel` directories: "
             "`config.json`, `generation_config.json`, safetensors weights).")
    L.append("- `expected/<name>.json` + `expected/<name>.safetensors`: reference outputs for that model "
             "(schema below); the safetensors file holds the f32 logits tensors `logits_<k>`.")
    L.append("- `text/sample.txt`: English prose plus numbers/code/unicode lines; perplexity input for `full-vocab`.")
    L.append(f"- `tokenizer_cases.json`: {n_tok_cases} `{{\"text\", \"ids\", \"decoded\"}}` cases from "
             "`GPT2TokenizerFast(tokenizer_file=crates/gpt2rs/assets/tokenizer/tokenizer.json)`: "
             "`ids = encode(text, add_special_tokens=False)`, `decoded = decode(ids)`. "
             "`<|endoftext|>` inside text maps to 50256. "
             + ("All decoded strings equal their text." if not tok_mismatches else
                f"Decoded differs from text for: {tok_mismatches!r}."))
    L.append("")
    L.append("## Models\n")
    L.append("All weights are re-drawn after construction (transformers' own init would leave biases at 0, "
             "LayerNorms at 1/0 and give near-uniform outputs): wte/untied lm_head ~ N(0, wte_std); wpe ~ N(0, 1.0); "
             "c_attn ~ N(0, 3/sqrt(n_embd)); attn c_proj and mlp c_fc ~ N(0, 1/sqrt(n_embd)); "
             "mlp c_proj ~ N(0, 1/sqrt(n_inner)); all linear biases ~ N(0, 0.2); "
             "LayerNorm weight ~ U[0.5, 1.5], LayerNorm bias ~ N(0, 0.2). "
             "`bos_token_id = eos_token_id = vocab_size - 1` everywhere. Reference outputs are computed from "
             "the checkpoint as loaded back from disk and upcast to f32 (so f16/bf16 models use the rounded weights).\n")
    L.append("Statistics: mean top-1 probability and mean entropy over every next-token distribution of the "
             "logits cases plus the first n_positions perplexity ids; distinct tokens in each 20-token greedy output.\n")
    L.append("| name | layers | n_embd | heads | n_inner | vocab | n_pos | stored | layout | wte_std | mean top-1 p | mean entropy (uniform) | greedy distinct | batched == individual |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        c = r["doc"]["config"]
        s = r["stats"]
        L.append(f"| `{r['name']}` | {c['n_layer']} | {c['n_embd']} | {c['n_head']} | {c['n_inner']} | {c['vocab_size']} | "
                 f"{c['n_positions']} | {c['dtype_stored']} | {c['layout']}{'' if c['tie_word_embeddings'] else ', untied lm_head'} | "
                 f"{r['init'].get('wte')} | {s['mean_top1_prob']} | {s['mean_entropy_nats']} ({s['uniform_entropy_nats']}) | "
                 f"{s['greedy_distinct_tokens']} | {r['equal']} |")
    L.append("")
    L.append("Variant notes:\n")
    L.append("- `tiny`, `odd-heads` (head dim 16, n_inner 200 != 4*n_embd), `distil-like`, `untied-head`, `full-vocab`: "
             "`save_pretrained` (transformers 5 always writes safetensors; tensor names carry the `transformer.` prefix, "
             "tied models store no `lm_head.weight`).")
    L.append("- `f16-stored` / `bf16-stored`: `tiny`-shaped, saved after `.to(float16/bfloat16)`; config `dtype` says so.")
    L.append("- `untied-head`: `tie_word_embeddings: false`, file contains a distinct `lm_head.weight` [vocab, n_embd].")
    L.append("- `legacy-layout`: hand-written with `safetensors.torch.save_file` in the openai-community/gpt2 layout: "
             "names without `transformer.` (`wte.weight`, `h.0.attn.c_attn.weight`, ..., `ln_f.bias`), no `lm_head.weight`, "
             "plus `h.N.attn.bias` f32 [1,1,n_positions,n_positions] lower-triangular ones; old-style config.json "
             "(with `n_ctx`, no `dtype`). Checked that transformers loads it back into exactly the same weights.")
    sh = [r for r in results if r["name"] == "sharded"][0]
    files = sorted(set(x[0] for x in sh["tensors"].values()))
    L.append(f"- `sharded`: `save_pretrained(max_shard_size=\"200KB\")` -> {len(files)} shards "
             f"({', '.join(files)}) + `model.safetensors.index.json`.")
    L.append("- `full-vocab`: vocab 50257, usable with the real GPT-2 tokenizer (no tokenizer file in the directory), stored float16.")
    L.append("")
    L.append("## `expected/<name>.json` schema\n")
    L.append("```")
    L.append("model, model_dir, seed, logits_file")
    L.append("config: {n_layer, n_head, n_embd, n_inner, vocab_size, n_positions, layer_norm_epsilon, activation_function,")
    L.append("         tie_word_embeddings, dtype_stored, layout (hf|legacy|sharded), bos_token_id, eos_token_id}")
    L.append("init_stds: {param group -> std used}; stats: {mean_top1_prob, mean_entropy_nats, uniform_entropy_nats, greedy_distinct_tokens}")
    L.append("logits_cases: [{ids, tensor: \"logits_<k>\", positions: [stored position indices], text?}]")
    L.append("    tensor in <name>.safetensors is f32 [len(positions), vocab]; row r = logits at position positions[r]")
    L.append("    (all positions except full-vocab, which stores only the last position)")
    L.append("greedy: [{prompt, max_new_tokens: 20, output: [new ids only, ends with eos if eos was generated], eos_token_id, prompt_text?}]")
    L.append("batched_greedy: {prompts, max_new_tokens, outputs: [[new ids, cut at and including first eos]], pad_token_id,")
    L.append("                 padding_side: \"left\", eos_token_id, equal_to_individual}")
    L.append("perplexity: [{ids | (text_file, n_ids), max_length, stride, n_tokens, mean_nll, ppl,")
    L.append("              n_scored_tokens, scored_mean_nll, scored_ppl, windows: [{begin, end, trg_len, loss, scored}],")
    L.append("              token_logprobs? (tiny, stride = n_positions/2 only)}]")
    L.append("greedy_eos (tiny only): one greedy case {prompt, max_new_tokens, output, eos_token_id} whose output stops at eos")
    L.append("```\n")
    L.append("### Perplexity\n")
    L.append("`n_tokens`, `mean_nll`, `ppl` follow the transformers perplexity guide verbatim: per window "
             "`nll_sum += loss * (num_valid_tokens - 1)`, `n_tokens += num_valid_tokens - 1`, `ppl = exp(nll_sum / n_tokens)`. "
             "Note that this is not exactly the mean NLL of the scored tokens when windows overlap: for windows after the "
             "first, the label at window position 0 is already -100, so the loss averages over `num_valid_tokens` tokens "
             "but is weighted by `num_valid_tokens - 1`. `n_scored_tokens`, `scored_mean_nll`, `scored_ppl` are the exact "
             "per-token values (sum of -log p over every token the loss actually scored / their count). For stride == "
             "max_length (no overlap) both agree. `token_logprobs` lists log p(token) (natural log) in scoring order "
             "(window by window); its negated mean is `scored_mean_nll`. `windows[i].loss` is the HF loss of window i. "
             "Losses are f32 from HF; sums are accumulated in Python float64.\n")
    L.append("### Batched greedy\n")
    L.append("The three greedy prompts are generated in one left-padded batch (pad = eos, attention_mask 0 on pads; "
             "transformers 5 `generate` derives position_ids from the attention mask: cumsum(mask) - 1). "
             "`equal_to_individual` per model: "
             + ", ".join(f"{r['name']}={r['equal']}" for r in results) + ".\n")
    L.append("Every individual greedy output was also cross-checked against a plain full-recompute argmax loop (no KV cache).\n")
    with open(os.path.join(FIX, "README.md"), "w") as f:
        f.write("\n".join(L))


# ---------------------------------------------------------------------------------------------


def main():
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, safetensors {safetensors.__version__}")
    os.makedirs(MODELS, exist_ok=True)
    os.makedirs(EXPECTED, exist_ok=True)
    os.makedirs(TEXT, exist_ok=True)
    with open(os.path.join(TEXT, "sample.txt"), "w", encoding="utf-8") as f:
        f.write(SAMPLE_TEXT)
    tok = GPT2TokenizerFast(tokenizer_file=TOKENIZER_FILE)
    assert tok.encode("<|endoftext|>") == [50256]
    n_cases, mismatches = tokenizer_cases(tok)
    only = set(sys.argv[1:])
    results = []
    for v in VARIANTS:
        if only and v["name"] not in only:
            continue
        results.append(build_variant(v, tok))
    if not only:
        write_readme(results, len(n_cases), mismatches)
    total = 0
    for dp, _, fns in os.walk(FIX):
        for fn in fns:
            total += os.path.getsize(os.path.join(dp, fn))
    print(f"total fixtures size: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
