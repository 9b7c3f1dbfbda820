"""``plexus serve`` end to end: ``mpirun -n 2`` on a free port with the tiny demo model.

Most tests share one server (module fixture). Answers are checked against ``plexus generate
--json`` run on the same prompts (an independent path through the CLI), with the official
``openai`` client. The shutdown and worker-death tests start servers of their own.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest

from tests.helpers import REPO_ROOT, assert_clean_error, make_hf_checkpoint, mpi_env, mpirun_cmd, plexus_cmd, run_mpi
from tests.test_server import BAD_REQUESTS, assert_error_shape, materialize, request_headers

KEY = "sk-plexus-env"
MAX_BODY = 4096
MAX_TOKENS = 24
PROMPTS = [f"{w} upon a time" for w in ("Once", "Twice", "Thrice")] + [
    "The cat sat on", "Hello world", "A B C D", "In the beginning", "She said",
    "1 2 3 4 5", "The quick brown fox", "Lorem ipsum", "Plexus pools memory",
    "Tensor parallel", "Why is the sky", "def main():", "Knock knock"]
CHATS = [[{"role": "user", "content": "Hello"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]]


class Serve:
    """``mpirun -n 2 plexus serve --port 0 -v ...`` in its own process group; its merged output
    is collected by a thread, the port read from the startup line. ``launcher``: a command that
    takes the serve options instead (e.g. launch/serve.sh ... --)."""

    def __init__(self, model_dir, *args, mpirun_args=(), wrap=(), env=None, launcher=None):
        serve_args = ("--model", model_dir, "--port", "0", "-v", *args)
        cmd = ([*map(str, launcher), *map(str, serve_args)] if launcher else
               mpirun_cmd(2, *mpirun_args, *wrap, *plexus_cmd("serve", *serve_args)))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=mpi_env(env), start_new_session=True)
        self.lines: list[str] = []
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout=90):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            assert self.proc.poll() is None, "server exited:\n" + self.output
            if self.port is None:
                m = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", self.output)
                self.port = int(m.group(1)) if m else None
            elif call(self.port, "GET", "/health", timeout=2)[0] == 200:
                return self
            time.sleep(0.1)
        raise AssertionError("server not ready in time:\n" + self.output)

    def ranks(self) -> dict[int, psutil.Process]:
        out = {}
        for c in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                rank = c.environ().get("OMPI_COMM_WORLD_RANK")
                if rank is not None and c.name() not in ("sh", "bash", "dash"):
                    out[int(rank)] = c
            except (psutil.Error, TypeError, ValueError):
                pass
        assert set(out) == {0, 1}, out
        return out

    def wait(self, timeout) -> int:
        return self.proc.wait(timeout)

    def kill(self):
        """Kill the launcher and everything under it (a launcher may start mpirun in a process
        group of its own)."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in tree:
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait(10)


def call(port, method, path, body=None, headers=None, timeout=30):
    """(status, parsed JSON or raw bytes); (None, error) when the connection fails."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body if body is None or isinstance(body, bytes) else json.dumps(body),
                     headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data)
        except ValueError:
            return resp.status, data
    except OSError as e:
        return None, e
    finally:
        conn.close()


def client(port, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=60)


def metric(port, name) -> float:
    status, text = call(port, "GET", "/metrics")
    for line in text.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def slow_model(demo_tiny, tmp_path_factory):
    """A model with the tiny demo's tokenizer and name but 200 MB of float32 weights and a
    4096-token context: a long request takes seconds even with the fused decode kernel, so
    the signal and worker-death tests can be sure one is in flight."""
    return make_hf_checkpoint("llama", tmp_path_factory.mktemp("slow") / "tiny", tokenizer_from=demo_tiny,
                              hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                              num_key_value_heads=8, vocab_size=512, max_position_embeddings=4096,
                              tie_word_embeddings=False)


@pytest.fixture(scope="module")
def reference(demo_tiny, tmp_path_factory):
    """``plexus generate --json`` on PROMPTS and CHATS (greedy, MAX_TOKENS), under mpirun -n 2."""
    path = tmp_path_factory.mktemp("ref") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS) +
                    "".join(json.dumps({"messages": m}) + "\n" for m in CHATS))
    res = run_mpi(2, plexus_cmd("generate", "--model", demo_tiny, "--prompts-file", path, "--json",
                                "--max-tokens", MAX_TOKENS), timeout=120)
    assert res.rc == 0, res.describe()
    rows = res.json_lines()
    assert len(rows) == len(PROMPTS) + len(CHATS)
    return rows[:len(PROMPTS)], rows[len(PROMPTS):]


@pytest.fixture(scope="module")
def server_started(demo_tiny):
    s = Serve(demo_tiny, "--max-body-bytes", MAX_BODY, env={"PLEXUS_API_KEY": KEY})
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture(scope="module")
def server(server_started, reference):
    """The shared server, ready (it loads while ``reference`` runs generate)."""
    return server_started.wait_ready()


def usage_of(ref):
    return (len(ref["prompt_token_ids"]), len(ref["token_ids"]))


@pytest.mark.timeout(180)
def test_completions_match_generate(server, reference):
    plain, _ = reference
    c = client(server.port)
    for ref in plain[:2]:
        r = c.completions.create(model="tiny", prompt=ref["prompt"], max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == ref["text"]
        assert r.choices[0].finish_reason == ref["finish_reason"]
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == usage_of(ref)
        assert r.usage.total_tokens == sum(usage_of(ref))
        stream = c.completions.create(model="tiny", prompt=ref["prompt"], max_tokens=MAX_TOKENS, temperature=0,
                                      stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == ref["text"]
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == ref["finish_reason"]
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == usage_of(ref)


@pytest.mark.timeout(180)
def test_chat_matches_generate(server, reference):
    _, chats = reference
    c = client(server.port)
    for ref in chats:
        r = c.chat.completions.create(model="tiny", messages=ref["messages"], max_tokens=MAX_TOKENS,
                                      temperature=0)
        assert r.object == "chat.completion" and r.model == "tiny"
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == ref["text"]
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == usage_of(ref)
        stream = c.chat.completions.create(model="tiny", messages=ref["messages"], max_completion_tokens=MAX_TOKENS,
                                           temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref["text"]
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == usage_of(ref)


@pytest.mark.timeout(180)
def test_16_concurrent_clients(server, reference):
    plain, _ = reference
    assert len(plain) == 16

    def one(i):
        c = client(server.port)  # a client (and connection pool) of its own
        if i % 2:
            chunks = c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=0,
                                          stream=True)
            return "".join(ch.choices[0].text for ch in chunks if ch.choices)
        return c.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=MAX_TOKENS,
                                    temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, range(16)))
    want = [ref["text"] for ref in plain]
    assert len(set(want)) == 16  # distinct answers, so a mix-up cannot go unnoticed
    assert got == want


@pytest.mark.timeout(120)
def test_seeded_sampling_repeats(server):
    c = client(server.port)
    texts = [c.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=1.0, seed=7).choices[0].text
             for _ in range(2)]
    other = c.completions.create(model="tiny", prompt="Once", max_tokens=12, temperature=1.0, seed=8).choices[0].text
    assert texts[0] == texts[1] and texts[0] != other


@pytest.mark.timeout(120)
def test_bad_requests(server):
    """The shared table of bad requests, against the real mesh; it must stay up afterwards."""
    failures = []
    for name, method, path, body, extra, status, param in BAD_REQUESTS:
        data = materialize(body, "tiny", 512, MAX_BODY, KEY)
        got, resp = call(server.port, method, path, data, request_headers(extra, KEY))
        try:
            assert_error_shape(resp, status, got)
            if param is not None:
                assert resp["error"]["param"] == param, resp
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
    status, health = call(server.port, "GET", "/health")
    assert status == 200 and health["status"] == "ok"
    r = client(server.port).completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens == 3


@pytest.mark.timeout(120)
def test_api_key_from_env(server):
    with pytest.raises(openai.AuthenticationError):
        client(server.port, key="wrong").models.list()
    assert [m.id for m in client(server.port).models.list()] == ["tiny"]


@pytest.mark.timeout(120)
def test_health_models_metrics(server):
    status, health = call(server.port, "GET", "/health")
    assert status == 200
    assert health["status"] == "ok" and health["world_size"] == 2 and health["model"] == "tiny"
    assert isinstance(health["version"], str)
    status, models = call(server.port, "GET", "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [("tiny", "model")]
    client(server.port).completions.create(model="tiny", prompt="Hi", max_tokens=2, temperature=0)
    status, text = call(server.port, "GET", "/metrics")
    text = text.decode()
    assert status == 200
    for name in ("plexus_requests_total", "plexus_prompt_tokens_total", "plexus_generation_tokens_total",
                 "plexus_time_to_first_token_seconds_bucket", "plexus_time_per_output_token_seconds_bucket",
                 "plexus_queue_depth", "plexus_world_size 2.0"):
        assert name in text, name
    assert re.search(r'plexus_requests_total\{route="/v1/completions",status="200"\} [1-9]', text)
    assert metric(server.port, "plexus_generation_tokens_total") >= 2


@pytest.mark.timeout(120)
def test_client_disconnect_stops_generation(slow_model):
    """A client that closes its connection mid-stream: generation for it stops (counted as
    cancelled) and the next request is served. On a server of its own with the slow model, so
    that the abandoned request (3000 tokens, many seconds) cannot finish on its own before the
    server notices, however loaded the machine."""
    s = Serve(slow_model, env={"PLEXUS_API_KEY": KEY})
    try:
        s.wait_ready()
        body = json.dumps({"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3000, "temperature": 0,
                           "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.close()  # mid-stream
        end = time.monotonic() + 60
        while metric(s.port, "plexus_requests_cancelled_total") < 1:
            assert time.monotonic() < end, "the abandoned request was never cancelled\n" + s.output
            time.sleep(0.05)
        made = metric(s.port, "plexus_generation_tokens_total")
        assert made < 3000, f"the abandoned request generated {made} of 3000 tokens"
        r = client(s.port).completions.create(model="tiny", prompt="Hi", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
        assert metric(s.port, "plexus_generation_tokens_total") == made + 4
    finally:
        s.kill()


# ---- lifecycle: servers of their own --------------------------------------------------------------

def _long_request(port, out, key, stream=False, max_tokens=400, prompt="Once upon a time", api_key=KEY):
    """Run one long completion; out[key] = ("ok", response) | ("error", status code, body) | ("conn", exc)."""
    try:
        c = client(port, api_key)
        if stream:
            chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True}))
            out[key] = ("ok", chunks)
        else:
            out[key] = ("ok", c.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                                   temperature=0))
    except openai.APIStatusError as e:
        out[key] = ("error", e.status_code, e.body)
    except openai.APIConnectionError as e:  # the server went away without answering
        out[key] = ("conn", e)
    except openai.APIError as e:  # an error event inside a stream that had started
        out[key] = ("error", "stream", e.body)
    except Exception as e:  # noqa: BLE001 - the connection went away
        out[key] = ("conn", e)


@pytest.mark.timeout(120)
def test_sigterm_to_rank0_drains_then_every_rank_exits_0(demo_tiny):
    s = Serve(demo_tiny, "--api-key", "sk-flag", env={"PLEXUS_API_KEY": "sk-env-loses"})
    try:
        s.wait_ready()
        assert call(s.port, "GET", "/v1/models")[0] == 401
        assert call(s.port, "GET", "/v1/models", headers={"Authorization": "Bearer sk-env-loses"})[0] == 401
        out = {}
        t = threading.Thread(target=_long_request, args=(s.port, out, "stream"),
                             kwargs=dict(stream=True, max_tokens=100, api_key="sk-flag"))
        t.start()
        time.sleep(0.3)
        rank0 = s.ranks()[0]
        assert f"SIGTERM rank 0 (pid {rank0.pid})" in s.output  # the ready line says whom to signal
        rank0.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        time.sleep(0.2)
        status, err = call(s.port, "GET", "/health", timeout=5)
        assert status in (None, 503), "still accepting after SIGTERM"
        t.join(30)
        rc = s.wait(15)
        took = time.monotonic() - t0
        kind, chunks = out["stream"][:2]
        assert kind == "ok", out
        assert chunks[-1].usage.completion_tokens == 100  # the in-flight request was finished, not cut
        assert rc == 0 and took < 10, s.output
        assert len(re.findall(r"plexus(\[rank 1\])?: exiting \(status 0\)", s.output)) == 2, s.output
    finally:
        s.kill()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_serve_sh_drains_a_stream_then_exits_0(slow_model, sig):
    """launch/serve.sh passes SIGTERM/SIGINT on to mpirun as SIGUSR1 (forwarded to every rank):
    rank 0 finishes the stream in flight (a drain timeout long enough for a loaded machine),
    logs one line, releases the other rank, and the script, mpirun and every rank exit 0."""
    s = Serve(slow_model, "--drain-timeout", "90", launcher=["bash", REPO_ROOT / "launch/serve.sh", "-n", "2", "--"],
              env={"PLEXUS_VENV": sys.prefix, "PYTHONPATH": ""})
    try:
        s.wait_ready()
        out = {}
        t = threading.Thread(target=_long_request, args=(s.port, out, "stream"),
                             kwargs=dict(stream=True, max_tokens=200))
        t.start()
        end = time.monotonic() + 60
        while metric(s.port, "plexus_requests_running") < 1:  # the stream is being generated
            assert time.monotonic() < end, s.output
            time.sleep(0.02)
        s.proc.send_signal(sig)
        s.proc.send_signal(signal.SIGCONT)  # as systemd sends right after its KillSignal
        t.join(100)
        rc = s.wait(30)
        kind, chunks = out["stream"][:2]
        assert kind == "ok", out
        assert chunks[-1].usage.completion_tokens == 200  # finished, not cut
        assert rc == 0, s.output
        stops = [line for line in s.lines if "stopping: no new requests; finishing 1 in-flight request" in line]
        assert len(stops) == 1, s.output
        assert len(re.findall(r"plexus(\[rank 1\])?: exiting \(status 0\)", s.output)) == 2, s.output
    finally:
        s.kill()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_mpirun_every_rank_exits_0(slow_model, tmp_path, sig):
    # each rank runs under a shell that records its exit status (mpirun's own status is 1
    # whenever PRRTE ended the job itself, whatever the ranks did)
    record = ['sh', '-c', f'trap "" TERM INT; "$@"; echo $? > {tmp_path}/rank$OMPI_COMM_WORLD_RANK', 'sh']
    s = Serve(slow_model, wrap=record)
    try:
        s.wait_ready()
        out = {}
        t = threading.Thread(target=_long_request, args=(s.port, out, "a"), kwargs=dict(max_tokens=2000))
        t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        s.proc.send_signal(sig)
        s.wait(15)
        took = time.monotonic() - t0
        t.join(15)
        assert took < 10, s.output
        assert out["a"][:2] == ("error", 503), out
        assert out["a"][2]["code"] == "shutting_down"
        codes = {p.name: p.read_text().strip() for p in tmp_path.glob("rank*")}
        assert codes == {"rank0": "0", "rank1": "0"}, (codes, s.output)
    finally:
        s.kill()


STREAMS = 16  # a full batch (--max-batch's default) of streams in flight, then PLAIN waiting behind them
PLAIN = 4


def _kill_worker_mid_flight(s: Serve):
    """Start STREAMS long streaming requests (the batch) and PLAIN plain ones (queued behind
    them), SIGKILL rank 1 while every stream is generating."""
    s.wait_ready()
    out, threads = {}, []
    for i in range(STREAMS + PLAIN):
        threads.append(threading.Thread(target=_long_request, args=(s.port, out, i),
                                        kwargs=dict(stream=i < STREAMS, max_tokens=2000, prompt=f"Story {i}:")))
        threads[-1].start()
        time.sleep(0.02)
    deadline = time.monotonic() + 30
    while metric(s.port, "plexus_generation_tokens_total") < 4 * STREAMS and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(s.port, "plexus_requests_running") == STREAMS and metric(s.port, "plexus_queue_depth") == PLAIN
    s.ranks()[1].kill()
    t0 = time.monotonic()
    for t in threads:
        t.join(10)
    return out, t0


@pytest.mark.timeout(120)
def test_worker_death_under_ulfm_gives_503_and_nonzero_exit(slow_model):
    s = Serve(slow_model, mpirun_args=("--with-ft", "ulfm"))
    try:
        out, t0 = _kill_worker_mid_flight(s)
        answered = time.monotonic() - t0
        status, body = call(s.port, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
        health = call(s.port, "GET", "/health")
        rc = s.wait(15)
        assert answered < 5, out
        for i in range(STREAMS):  # every stream in flight ends with an error event
            assert out[i][:2] == ("error", "stream") and out[i][2]["code"] == "mesh_failed", out[i]
        for i in range(STREAMS, STREAMS + PLAIN):
            assert out[i][:2] == ("error", 503) and out[i][2]["code"] == "mesh_failed", out[i]
        assert status == 503 and body["error"]["code"] == "mesh_failed", body
        assert health[0] == 503 and health[1]["status"] == "failed", health
        assert rc != 0 and time.monotonic() - t0 < 10, s.output
    finally:
        s.kill()


@pytest.mark.timeout(120)
def test_worker_death_under_plain_mpirun_gives_503_and_nonzero_exit(slow_model):
    """Without ULFM, PRRTE ends the job itself (SIGCONT, SIGTERM, SIGKILL 0.25 s apart); rank 0
    answers its waiting clients in that half second (best effort: on a starved machine a
    response may not make it out before the SIGKILL, then that client sees the connection close)."""
    s = Serve(slow_model)
    try:
        out, t0 = _kill_worker_mid_flight(s)
        rc = s.wait(15)
        assert rc != 0 and time.monotonic() - t0 < 10, s.output
        assert all(out[i][0] in ("error", "conn") for i in range(STREAMS)), out  # an error event, or cut off
        answered = [out[i][:2] == ("error", 503) for i in range(STREAMS, STREAMS + PLAIN)]
        assert all(a or out[STREAMS + i][0] == "conn" for i, a in enumerate(answered)), out  # never a 200 or a hang
        assert any(answered) or any(out[i][0] == "error" for i in range(STREAMS)), out
    finally:
        s.kill()


@pytest.mark.timeout(120)
def test_port_in_use_is_a_clean_error_on_every_rank(demo_tiny):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = run_mpi(2, plexus_cmd("serve", "--model", demo_tiny, "--port", port), timeout=60)
    assert_clean_error(res, "cannot listen on 127.0.0.1:%d" % port)
