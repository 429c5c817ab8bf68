"""`longctx serve` against the official `openai` Python client (run by scripts/openai-check.sh).

Starts the server on the default model, then: chat and completions, streaming and not, usage
counts, 32 concurrent clients, the error cases with their statuses, and a client that leaves
mid-stream freeing its KV blocks (seen through /metrics). Prints one closing line,
"openai: N passed, M failed", and exits non-zero on a failure.
"""

import concurrent.futures
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai

BIN = sys.argv[1]
results = []


def check(name, fn):
    try:
        fn()
        results.append((name, None))
        print(f"ok   {name}", flush=True)
    except Exception as e:  # noqa: BLE001 - every failure is reported, not raised
        results.append((name, e))
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)


server = subprocess.Popen(
    [BIN, "serve", "--port", "0", "--prefix-cache", "0", "--max-context", "2048",
     "--max-running", "16", "--max-waiting", "64"],
    stderr=subprocess.PIPE, text=True)
line = ""
while "serving " not in line:
    line = server.stderr.readline()
    if not line:
        sys.exit("the server exited before serving")
m = re.match(r"serving (\S+) on (http://\S+)", line)
model, base = m.group(1), m.group(2)
threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=300)


def metric(name):
    text = urllib.request.urlopen(base + "/metrics").read().decode()
    for row in text.splitlines():
        key, _, value = row.rpartition(" ")
        if key == name:
            return float(value)
    raise KeyError(name)


def chat_whole():
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
        temperature=0)
    c = r.choices[0]
    assert r.object == "chat.completion" and c.message.role == "assistant", r
    assert c.message.content, r
    assert c.finish_reason in ("stop", "length"), r
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.prompt_tokens > 0, u
    assert (c.finish_reason == "length") == (u.completion_tokens == 12), r
    return c.message.content, u


def chat_streamed():
    whole, usage = chat_whole()
    parts, finish, got_usage = [], None, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=12,
        temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            got_usage = chunk.usage
            assert chunk.choices == [], chunk
            continue
        d = chunk.choices[0]
        if d.delta.content:
            parts.append(d.delta.content)
        if d.finish_reason:
            finish = d.finish_reason
    assert "".join(parts) == whole, (parts, whole)
    assert finish in ("stop", "length")
    assert got_usage.completion_tokens == usage.completion_tokens, (got_usage, usage)
    assert got_usage.prompt_tokens == usage.prompt_tokens


def completions():
    r = client.completions.create(model=model, prompt="The capital of France is",
                                  max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text, r
    assert r.usage.completion_tokens <= 8
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0,
        stream=True))
    assert text == r.choices[0].text, (text, r.choices[0].text)
    cut = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=16,
                                    temperature=0, stop=[" 7"])
    assert cut.choices[0].finish_reason == "stop" and " 7" not in cut.choices[0].text, cut


def sampling():
    kw = dict(model=model, prompt="Once upon a time", max_tokens=10, temperature=0.9,
              top_p=0.9, seed=7, extra_body={"top_k": 40})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b, (a, b)


def concurrent_clients():
    def one(i):
        if i % 2:
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": f"Tell me about {i}."}],
                max_tokens=16, temperature=0)
            assert r.choices[0].message.content is not None
            return r.usage.completion_tokens
        n = 0
        for c in client.completions.create(model=model, prompt=f"Number {i} is", max_tokens=16,
                                           temperature=0, stream=True):
            n += bool(c.choices and c.choices[0].text)
        return n
    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        counts = list(ex.map(one, range(32)))
    assert all(0 < c <= 16 for c in counts), counts


def errors():
    def status(fn):
        try:
            fn()
        except openai.APIStatusError as e:
            body = e.body if isinstance(e.body, dict) else {}
            assert "message" in body, e.body
            return e.status_code, body.get("code")
        raise AssertionError("no error")
    msg = [{"role": "user", "content": "hi"}]
    assert status(lambda: client.chat.completions.create(model="nope", messages=msg)) == (
        400, "model_not_found")
    assert status(lambda: client.chat.completions.create(
        model=model, messages=msg, temperature=5))[0] == 400
    assert status(lambda: client.chat.completions.create(
        model=model, messages=msg, top_p=0))[0] == 400
    assert status(lambda: client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "word " * 3000}]))[1] == (
        "context_length_exceeded")
    assert status(lambda: client.chat.completions.create(
        model=model, messages=msg, max_tokens=100000))[1] == "context_length_exceeded"
    req = urllib.request.Request(base + "/v1/chat/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    try:
        urllib.request.urlopen(req)
        raise AssertionError("malformed JSON accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 400 and b'"error"' in e.read(), e
    models = client.models.list()
    assert [m.id for m in models.data] == [model]


def disconnect_frees_blocks():
    stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=1500,
                                       temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 5:
            break
    assert metric("longctx_requests_running") >= 1
    stream.close()
    t0 = time.time()
    while metric("longctx_requests_running") > 0 or metric('longctx_kv_blocks{tier="device"}') > 0:
        assert time.time() - t0 < 30, "blocks still held after the client left"
        time.sleep(0.05)


try:
    check("chat, whole", chat_whole)
    check("chat, streamed with usage", chat_streamed)
    check("completions, whole, streamed, stop", completions)
    check("sampling with a seed repeats", sampling)
    check("32 concurrent clients", concurrent_clients)
    check("errors with their statuses", errors)
    check("a client leaving mid-stream frees its KV", disconnect_frees_blocks)
finally:
    server.kill()
    server.wait()
failed = sum(1 for _, e in results if e)
print(f"openai: {len(results) - failed} passed, {failed} failed")
sys.exit(1 if failed else 0)
