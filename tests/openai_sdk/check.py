"""Drives coachd's /v1 with the official OpenAI Python SDK, unchanged, as a user would.

Run by tests/openai_sdk.rs against a coachd it spawned (LLM calls go to the fake upstream):
    python check.py BASE_URL API_KEY
Exits non-zero, with the failed assertion, when the SDK does not work against coachd.
"""

import sys

import openai

base_url, api_key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0)
hello = [{"role": "user", "content": "hi"}]

# Non-streaming: a typed ChatCompletion.
r = client.chat.completions.create(model="chat", messages=hello, temperature=0.3, max_tokens=50)
assert r.object == "chat.completion", r
assert r.choices[0].message.role == "assistant", r
assert r.choices[0].message.content == "Hello from the fake upstream.", r
assert r.choices[0].finish_reason == "stop", r
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
assert r.model == "openai/gpt-4o-mini", r.model

# Streaming with include_usage: text deltas, a finish reason, then the usage chunk.
text, finish, usage = "", None, None
stream = client.chat.completions.create(
    model="chat", messages=hello, stream=True, stream_options={"include_usage": True}
)
for chunk in stream:
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
assert text == "Hello from the fake upstream.", text
assert finish == "stop", finish
assert usage is not None and usage.completion_tokens == 5, usage

# The helper that collects a stream.
with client.chat.completions.stream(model="openai/gpt-4o-mini", messages=hello) as s:
    final = s.get_final_completion()
assert final.choices[0].message.content == "Hello from the fake upstream.", final

# Models.
ids = [m.id for m in client.models.list()]
assert "chat" in ids and "openai/gpt-4o-mini" in ids, ids
assert client.models.retrieve("openai/gpt-4o-mini").owned_by == "openai"

# Errors become the SDK's typed exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=hello)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e
try:
    client.chat.completions.create(model="chat", messages=hello, n=3)
    raise AssertionError("n=3 accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400, e
try:
    openai.OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0).models.list()
    raise AssertionError("wrong key accepted")
except openai.AuthenticationError:
    pass

# A failure after the first token raises while iterating, after the text that came before it.
text = ""
try:
    for chunk in client.chat.completions.create(model="openai/broken", messages=hello, stream=True):
        for choice in chunk.choices:
            text += choice.delta.content or ""
    raise AssertionError("a mid-stream failure ended cleanly")
except openai.APIError as e:
    assert text == "t0 t1", text

print("openai SDK", openai.__version__, "works against coachd")
