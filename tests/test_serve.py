"""`specdecode serve` on the smallest registry model, over loopback: OpenAI's own client streaming
and not, greedy output identical to `generate` (alone and with concurrent requests), a client that
goes away freeing the model, bad input answered with OpenAI's error objects, the API key, and the
Prometheus counters agreeing with the responses' statistics."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from specdecode import SpecDecoder  # noqa: E402
from specdecode.config import SamplingParams, SpecConfig  # noqa: E402
from specdecode.serve.app import make_app  # noqa: E402

MODEL = "smollm2-135m-instruct"
KEY = "test-key"
SPEC = SpecConfig(drafter="prompt-lookup")
# Inputs the answers repeat, so that prompt lookup drafts and some drafts are accepted.
CODE = "Rewrite this with a for loop:\n\nnumbers = [1, 2, 3]\nsquares = [n * n for n in numbers]\n"
QUESTIONS = [
    "Repeat after me: the quick brown fox jumps over the lazy dog.",
    "Say the days of the week, Monday to Sunday.",
    CODE,
    "Count from one to ten in words.",
]


@pytest.fixture(scope="module")
def llm() -> SpecDecoder:
    return SpecDecoder.load(MODEL, spec=SPEC)


class Server:
    def __init__(self, llm: SpecDecoder, **options) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.app = make_app(llm, SPEC, MODEL, **options)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        # Starting measures what batched forwards cost: seconds here, minutes on a loaded machine.
        deadline = time.monotonic() + 600
        while not self.server.started:
            assert self.thread.is_alive(), "the server stopped while starting"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)

    def answer(self, question: str, tokens: int) -> str:
        """A greedy chat answer, through OpenAI's client."""
        reply = self.client().chat.completions.create(
            model=MODEL, messages=ask(question), max_tokens=tokens, temperature=0
        )
        return reply.choices[0].message.content

    def post(self, path: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url + path, data, headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def get(self, path: str, key: str | None = KEY) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def metric(self, name: str, **labels: str) -> float:
        """A sample's value from /metrics (0 when absent)."""
        _, text = self.get("/metrics")
        total = 0.0
        for line in text.decode().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                head, value = line.rsplit(" ", 1)
                if all(f'{k}="{v}"' in head for k, v in labels.items()):
                    total += float(value)
        return total

    def wait_for(self, name: str, value: float) -> None:
        """Until a gauge on /metrics reads `value` (sleeps alone can lose a race on a loaded
        machine)."""
        deadline = time.monotonic() + 120
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} never reached {value}"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(llm: SpecDecoder) -> Iterator[Server]:
    running = Server(llm, api_key=KEY)
    yield running
    running.stop()


def plain(llm: SpecDecoder, messages: list[dict], tokens: int) -> str:
    """`generate`'s greedy answer (through the API's chat, as the server's chat route)."""
    return llm.chat(messages, SamplingParams(max_new_tokens=tokens)).text


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def test_chat_through_openais_client_is_generates_output(server: Server, llm) -> None:
    reply = server.client().chat.completions.create(
        model=MODEL, messages=ask(CODE), max_tokens=40, temperature=0
    )
    assert reply.choices[0].message.content == plain(llm, ask(CODE), 40)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    stats = reply.model_extra["speculative_decoding"]
    assert stats["num_accepted_tokens"] <= stats["num_draft_tokens"]
    assert stats["mean_tokens_per_forward"] >= 1.0
    assert sum(stats["acceptance_histogram"]) == stats["num_target_forwards"]
    status, short = server.post(
        "/v1/chat/completions",
        {"messages": ask(CODE), "max_completion_tokens": 3, "ignore_eos": True, "temperature": 0},
    )
    assert status == 200 and short["usage"]["completion_tokens"] == 3


def test_streamed_chunks_add_up_to_the_whole_answer(server: Server, llm) -> None:
    client = server.client()
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=ask(CODE), max_tokens=40, temperature=0, stream=True
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain(llm, ask(CODE), 40)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0
    assert "speculative_decoding" in chunks[-1].usage.model_extra

    streamed = client.completions.create(
        model=MODEL, prompt=CODE, max_tokens=24, temperature=0, stream=True
    )
    whole = client.completions.create(model=MODEL, prompt=CODE, max_tokens=24, temperature=0)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    raw = llm.generate(CODE, SamplingParams(max_new_tokens=24), chat=False).text
    assert whole.choices[0].text == raw


def test_concurrent_greedy_requests_are_each_generates_output(server: Server, llm) -> None:
    steps = server.metric("specdecode:batch_size_count")
    alone = server.metric("specdecode:batch_size_bucket", le="1.0")
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(server.answer, QUESTIONS, [24] * len(QUESTIONS)))
    assert answers == [plain(llm, ask(q), 24) for q in QUESTIONS]
    steps = server.metric("specdecode:batch_size_count") - steps
    alone = server.metric("specdecode:batch_size_bucket", le="1.0") - alone
    assert alone < steps  # some forwards verified several requests at once


def test_a_request_is_undisturbed_by_others_failing_and_leaving(server: Server, llm) -> None:
    """A greedy request's answer stays `generate`'s while, beside it, a stream is cut by its
    client, a request is refused (over the context of the model) and another comes and goes."""
    long_stream = {"prompt": CODE, "max_tokens": 400, "stream": True, "ignore_eos": True}
    request = urllib.request.Request(
        server.url + "/v1/completions",
        json.dumps(long_stream).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    question = "Write a haiku about the sea, then explain it."
    with ThreadPoolExecutor(3) as pool:
        stream = urllib.request.urlopen(request, timeout=60)
        assert stream.readline().startswith(b"data:")
        answer = pool.submit(server.answer, question, 40)
        too_long = {"prompt": [10] * 50, "max_tokens": llm.target.max_context}
        short = {"prompt": "Hi", "max_tokens": 3}
        others = [pool.submit(server.post, "/v1/completions", b) for b in (too_long, short)]
        time.sleep(0.3)
        stream.close()  # cut while the others run
        codes = [other.result()[0] for other in others]
        assert answer.result() == plain(llm, ask(question), 40)
    assert codes == [400, 200]


def test_a_client_that_goes_away_frees_the_model(server: Server) -> None:
    aborted = server.metric("specdecode:request_success_total", finished_reason="abort")
    body = {"prompt": CODE, "max_tokens": 1500, "stream": True, "ignore_eos": True}
    request = urllib.request.Request(
        server.url + "/v1/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    response = urllib.request.urlopen(request, timeout=60)
    assert response.readline().startswith(b"data:")  # generation is under way
    response.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 20
    while server.metric("specdecode:num_requests_running") > 0:
        assert time.monotonic() < deadline, "the abandoned request still holds the model"
        time.sleep(0.1)
    aborted_now = server.metric("specdecode:request_success_total", finished_reason="abort")
    assert aborted_now == aborted + 1
    # 1500 tokens would take the tiny model far longer than the wait above
    status, reply = server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and reply["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        (b"{not json", 400, "JSON"),
        ({"messages": []}, 400, "messages"),
        ({"messages": ask("hi"), "temperature": -1}, 400, "temperature"),
        ({"messages": ask("hi"), "n": 2}, 400, "n=1"),
        ({"messages": ask("hi"), "presence_penalty": 0.5}, 400, "penalties"),
        ({"messages": ask("hi"), "max_tokens": 10**6}, 400, "context"),
        ({"messages": ask("hi"), "model": "gpt-4"}, 404, "does not exist"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    ],
)
def test_bad_requests_get_openais_error_objects(server: Server, body, status, words) -> None:
    code, reply = server.post("/v1/chat/completions", body)
    assert code == status, reply
    assert set(reply["error"]) >= {"message", "type"} and words in reply["error"]["message"]


def test_a_prompt_over_the_context_is_refused(server: Server, llm) -> None:
    ids = [1] * llm.target.max_context
    code, reply = server.post("/v1/completions", {"prompt": ids, "max_tokens": 1})
    assert code == 400 and "context" in reply["error"]["message"]
    code, reply = server.post("/v1/completions", {"prompt": [10**9], "max_tokens": 1})
    assert code == 400 and "vocabulary" in reply["error"]["message"]


def test_the_api_key_guards_every_route_but_health(server: Server) -> None:
    assert server.get("/health", key=None)[0] == 200
    for path in ("/v1/models", "/metrics"):
        assert server.get(path, key=None)[0] == 401
        assert server.get(path, key="wrong")[0] == 401
    assert server.post("/v1/completions", {"prompt": "hi"}, key=None)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_metrics_count_what_the_responses_report(server: Server) -> None:
    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    before = {n: server.metric(f"specdecode:spec_decode_{n}_total") for n in names}
    per_pos = server.metric("specdecode:spec_decode_num_accepted_tokens_per_pos_total")
    seen = {n: 0 for n in names}
    for question in QUESTIONS[:2] + [CODE]:
        status, reply = server.post(
            "/v1/chat/completions", {"messages": ask(question), "max_tokens": 24, "temperature": 0}
        )
        assert status == 200
        for n in names:
            seen[n] += reply["speculative_decoding"][n]
    assert seen["num_draft_tokens"] > 0  # the code question's answer repeats it
    for n in names:
        assert server.metric(f"specdecode:spec_decode_{n}_total") - before[n] == seen[n], n
    per_pos_now = server.metric("specdecode:spec_decode_num_accepted_tokens_per_pos_total")
    assert per_pos_now - per_pos == seen["num_accepted_tokens"]
    assert server.metric("specdecode:time_to_first_token_seconds_count") >= 3


def test_a_request_failing_inside_the_batch_leaves_the_others_alone(
    server: Server, llm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose step raises (here, one of 7 tokens, by a patched `advance`) gets a 500
    and is counted as an error; the request verified in the same forwards is still `generate`'s."""
    from specdecode.engine import Decoding

    advance = Decoding.advance

    def failing(self, tree, logits, *args):
        if self.sampling.max_new_tokens == 7 and self.stats.new_tokens >= 2:
            raise RuntimeError("a step failed")
        return advance(self, tree, logits, *args)

    monkeypatch.setattr(Decoding, "advance", failing)
    errors = server.metric("specdecode:request_success_total", finished_reason="error")
    question = "Name three colours of the rainbow and say one thing about each."
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(server.answer, question, 30)
        time.sleep(0.2)
        failed = pool.submit(server.post, "/v1/completions", {"prompt": CODE, "max_tokens": 7})
        code, reply = failed.result()
        assert code == 500 and "a step failed" in reply["error"]["message"]
        assert answer.result() == plain(llm, ask(question), 30)
    assert server.metric("specdecode:request_success_total", finished_reason="error") == errors + 1


def test_a_full_queue_answers_429_at_once(llm) -> None:
    busy = Server(llm, max_waiting=1, max_batch=1)  # one runs, one waits, the third is refused
    try:
        long = {"prompt": CODE, "max_tokens": 300, "ignore_eos": True}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(busy.post, "/v1/completions", long, None)
            busy.wait_for("specdecode:num_requests_running", 1)
            second = pool.submit(busy.post, "/v1/completions", long, None)
            busy.wait_for("specdecode:num_requests_waiting", 1)
            started = time.monotonic()
            code, reply = busy.post("/v1/completions", long, None)
            waited = time.monotonic() - started
            assert code == 429 and reply["error"]["type"] == "rate_limit_error"
            assert waited < 5  # refused, not queued behind the others
            assert first.result()[0] == 200 and second.result()[0] == 200
    finally:
        busy.stop()


def test_serve_refuses_a_port_in_use_in_one_line(capsys) -> None:
    from specdecode.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--model", MODEL, "--port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: cannot listen") and str(port) in err[-1]


def test_stopping_answers_every_waiting_request_and_refuses_new_ones(llm) -> None:
    from specdecode.serve.metrics import ServerMetrics
    from specdecode.serve.scheduler import Job, Scheduler, ShuttingDown

    scheduler = Scheduler(llm, ServerMetrics("m"), max_waiting=4)
    received: list[list] = [[], []]
    for out in received:
        scheduler.submit(Job([1], SamplingParams(), SPEC, out.append))
    scheduler.stop()  # the thread never started: run its loop here
    scheduler._run()
    for out in received:
        assert isinstance(out[0], ShuttingDown) and out[1:] == [None]
    with pytest.raises(ShuttingDown):
        scheduler.submit(Job([1], SamplingParams(), SPEC, print))


def test_sigterm_lets_the_running_request_finish_and_exits_cleanly(tmp_path) -> None:
    import signal
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "specdecode", "serve", "--model", MODEL, "--port", str(port)]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, "did not start"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = client.completions.create(
            prompt=CODE, model=MODEL, max_tokens=300, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        first = next(chunks)  # the request runs
        server.send_signal(signal.SIGTERM)
        rest = list(chunks)
        text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
        assert rest[-1].choices[0].finish_reason == "length" and text
        assert rest[-1].usage.completion_tokens == 300
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
