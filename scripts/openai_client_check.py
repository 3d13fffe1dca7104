#!/usr/bin/env python3
"""Talks to a running `gpt2rs serve` with the official `openai` package, streaming and not.

Usage: openai_client_check.py BASE_URL EXPECTED_GREEDY_TEXT
(the expected text: the greedy 12-token continuation of "The quick brown fox").
Exits non-zero with a message on the first mismatch.
"""
import sys

import openai

base_url, expected = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)

models = [m.id for m in client.models.list().data]
assert models == ["gpt2"], models

args = dict(model="gpt2", prompt="The quick brown fox", max_tokens=12, temperature=0)
r = client.completions.create(**args)
assert r.choices[0].text == expected, (r.choices[0].text, expected)
assert r.choices[0].finish_reason == "length", r.choices[0].finish_reason
assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == 4, r.usage

pieces, finish, usage = [], None, None
for chunk in client.completions.create(**args, stream=True, stream_options={"include_usage": True}):
    for c in chunk.choices:
        pieces.append(c.text)
        finish = c.finish_reason or finish
    usage = chunk.usage or usage
assert "".join(pieces) == expected, (pieces, expected)
assert len(pieces) > 3 and finish == "length", (pieces, finish)
assert usage is not None and usage.completion_tokens == 12, usage

r = client.completions.create(model="gpt2", prompt=["Hello", "Rust is"], n=2, max_tokens=5,
                              temperature=0.9, seed=3, logprobs=2)
assert [c.index for c in r.choices] == [0, 1, 2, 3]
assert all(len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) >= 1 for c in r.choices)

try:
    client.completions.create(model="gpt2", prompt="hi", max_tokens=100000)
    raise SystemExit("max_tokens beyond the context was accepted")
except openai.BadRequestError as e:
    assert "max_tokens" in str(e), e
try:
    client.completions.create(model="gpt-4", prompt="hi")
    raise SystemExit("an unknown model was accepted")
except openai.NotFoundError as e:
    assert "gpt-4" in str(e), e

print("openai", openai.__version__, ": models, completion, stream, n x prompts with logprobs, errors: ok")
