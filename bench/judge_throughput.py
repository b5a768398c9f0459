"""Judge prompts answered per second by the HTTP judge: concurrent requests against one at a time — one run.

Prints one JSON line:
  judge_throughput: prompts per second of ``HTTPJudge`` with ``--concurrency`` requests in flight over
                    the same judge with one (the loop a sweep script usually is), against a local
                    OpenAI-compatible server that answers each request after ``--latency`` seconds
                    (a hosted API or a busy vLLM server is slower still); and the requests a second
                    pass over the same prompts sends with the response cache (0: all answered from disk).

    python bench/judge_throughput.py [--prompts 64] [--concurrency 8] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lantern.models.judge import HTTPJudge, ResponseCache, ask


def serve(latency: float) -> tuple[ThreadingHTTPServer, list]:
    """A chat-completions endpoint on 127.0.0.1 that echoes the prompt after ``latency`` seconds."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body["messages"][-1]["content"])
            time.sleep(latency)
            reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": "50"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(reply)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=3, help="passes per setting; the best is kept")
    args = parser.parse_args(argv)
    server, seen = serve(args.latency)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    prompts = [f"Rate answer {i} from 0 to 100." for i in range(args.prompts)]

    def rate(concurrency: int) -> float:
        judge = HTTPJudge(url, "stub", api_key_env=None, concurrency=concurrency, retries=0)
        best = float("inf")
        for _ in range(args.steps):
            start = time.perf_counter()
            assert ask(judge, prompts) == ["50"] * len(prompts)
            best = min(best, time.perf_counter() - start)
        return len(prompts) / best

    concurrent, one = rate(args.concurrency), rate(1)
    with tempfile.TemporaryDirectory() as tmp:
        judge = HTTPJudge(url, "stub", api_key_env=None, concurrency=args.concurrency)
        ask(judge, prompts, ResponseCache(Path(tmp) / "cache.jsonl"))
        before = len(seen)
        ask(judge, prompts, ResponseCache(Path(tmp) / "cache.jsonl"))  # a fresh process would read the same file
        again = len(seen) - before
    server.shutdown()
    row = {"benchmark": "judge_throughput", "prompts": args.prompts, "concurrency": args.concurrency,
           "latency_s": args.latency, "prompts_per_s": round(concurrent, 1), "baseline_prompts_per_s": round(one, 1),
           "ratio": round(concurrent / one, 2), "requests_on_cached_rerun": again}
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
