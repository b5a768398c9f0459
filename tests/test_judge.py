"""Judges: the OpenAI-compatible HTTP back-end against a stub server on 127.0.0.1 (errors, slow
answers, malformed JSON, the concurrency limit, the key), the on-disk cache, the local model."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lantern.errors import ConfigError
from lantern.models.judge import HTTPJudge, JudgeError, LocalJudge, ResponseCache, ask


class Stub:
    """A chat-completions server; ``script`` lists what the next requests get: ``ok``, ``500``,
    ``400``, ``slow`` (answers after 1 s), ``malformed``; then ``ok`` forever."""

    def __init__(self):
        self.script, self.requests, self.in_flight, self.most_in_flight = [], [], 0, 0
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append((body, self.headers.get("Authorization")))
                    what = stub.script.pop(0) if stub.script else "ok"
                    stub.in_flight += 1
                    stub.most_in_flight = max(stub.most_in_flight, stub.in_flight)
                try:
                    time.sleep(1.0 if what == "slow" else 0.05)
                    if what in ("500", "400"):
                        self.send_response(int(what))
                        self.end_headers()
                        return
                    prompt = body["messages"][-1]["content"]
                    payload = b"{not json" if what == "malformed" else json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": f"echo: {prompt}"}}]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(payload)
                finally:
                    with stub.lock:
                        stub.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def stub():
    s = Stub()
    yield s
    s.server.shutdown()


def _judge(stub, **kw):
    return HTTPJudge(stub.url, "stub-model", api_key_env=None, backoff=0.01, **kw)


def test_answers_come_back_in_order_with_the_model_and_prompt_sent(stub):
    assert _judge(stub).answer(["a", "b", "c"]) == ["echo: a", "echo: b", "echo: c"]
    body, _ = stub.requests[0]
    assert body["model"] == "stub-model" and body["temperature"] == 0.0 and body["messages"][-1]["role"] == "user"


def test_server_errors_and_malformed_json_are_retried(stub):
    stub.script = ["500", "malformed", "ok"]
    assert _judge(stub, concurrency=1).answer(["x"]) == ["echo: x"]
    assert len(stub.requests) == 3


def test_a_slow_answer_times_out_and_is_asked_again(stub):
    stub.script = ["slow"]
    assert _judge(stub, timeout=0.3, concurrency=1).answer(["x"]) == ["echo: x"]
    assert len(stub.requests) == 2


def test_a_client_error_fails_at_once_in_one_line(stub):
    stub.script = ["400"]
    with pytest.raises(JudgeError, match="HTTP 400") as err:
        _judge(stub).answer(["x"])
    assert len(stub.requests) == 1 and "\n" not in str(err.value)


def test_retries_run_out_with_the_last_reason(stub):
    stub.script = ["500"] * 3
    with pytest.raises(JudgeError, match=r"no answer after 3 tries \(last: HTTP 500"):
        _judge(stub, retries=2, concurrency=1).answer(["x"])


def test_no_more_requests_in_flight_than_the_concurrency_limit(stub):
    answers = _judge(stub, concurrency=3).answer([str(i) for i in range(12)])
    assert answers == [f"echo: {i}" for i in range(12)]
    assert 2 <= stub.most_in_flight <= 3


def test_the_key_comes_from_the_named_environment_variable(stub, monkeypatch):
    monkeypatch.setenv("LANTERN_TEST_KEY", "sekret")
    HTTPJudge(stub.url, "m", api_key_env="LANTERN_TEST_KEY").answer(["x"])
    assert stub.requests[0][1] == "Bearer sekret"
    monkeypatch.delenv("LANTERN_TEST_KEY")
    with pytest.raises(ConfigError, match="api_key_env"):
        HTTPJudge(stub.url, "m", api_key_env="LANTERN_TEST_KEY")


def test_the_cache_asks_each_prompt_once_and_survives_an_interruption(stub, tmp_path):
    judge, path = _judge(stub), tmp_path / "judge.jsonl"
    assert ask(judge, ["a", "b", "a"], ResponseCache(path)) == ["echo: a", "echo: b", "echo: a"]
    assert len(stub.requests) == 2
    with path.open("a") as fh:
        fh.write('{"key": "cut sh')  # an interrupted write
    assert ask(judge, ["b", "c", "a"], ResponseCache(path)) == ["echo: b", "echo: c", "echo: a"]
    assert len(stub.requests) == 3  # only "c" was new
    other = HTTPJudge(stub.url, "another-model", api_key_env=None)
    ask(other, ["a"], ResponseCache(path))
    assert len(stub.requests) == 4  # another judge's answers are its own


def test_bad_settings_name_the_field():
    with pytest.raises(ConfigError, match="base_url"):
        HTTPJudge("localhost:8000", "m", api_key_env=None)
    with pytest.raises(ConfigError, match="concurrency=0"):
        HTTPJudge("http://localhost:1", "m", api_key_env=None, concurrency=0)


def test_an_unreachable_endpoint_fails_in_one_line():
    judge = HTTPJudge("http://127.0.0.1:9", "m", api_key_env=None, retries=1, backoff=0.01, timeout=1)
    with pytest.raises(JudgeError, match="no answer after 2 tries"):
        judge.answer(["x"])


def test_a_local_model_judges_in_batches_deterministically(tmp_path):
    judge = LocalJudge("tiny-llama", max_new_tokens=5)
    first = ask(judge, ["is this fine?", "and this?"], ResponseCache(tmp_path / "c.jsonl"))
    assert len(first) == 2 and all(isinstance(a, str) for a in first)
    assert judge.answer(["is this fine?", "and this?"]) == first
