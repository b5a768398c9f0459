"""Judges: a model that reads a prompt and answers in text, behind one interface.

Two back-ends: a local Hugging Face model (``LocalJudge``, batched greedy decoding through
``generate``) and any OpenAI-compatible chat-completions endpoint (``HTTPJudge``: vLLM, a hosted
API), with a timeout, retries with exponential back-off, a concurrency limit and the key read
from an environment variable. ``ask`` puts either behind an on-disk cache keyed by (judge,
prompt): an interrupted sweep, run again, asks only what it had not asked yet.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from lantern.errors import ConfigError, LanternError, require


class JudgeError(LanternError, RuntimeError):
    """A judge could not answer (after its retries); the message says which and why."""


class Judge:
    """What every back-end provides; a config names one by ``class_path``."""

    key: str  # names the judge and every setting that changes its answers (keys the cache)
    # An LLM that follows the instructions in its prompt (any rubric); a classifier such as a guardian
    # answers one question whatever the prompt says, and only where a study asks that question.
    follows_instructions: bool = True

    def answer(self, prompts: Sequence[str]) -> list[str]:
        raise NotImplementedError

    def to(self, device) -> "Judge":
        """Move local weights next to the model under study (nothing to move for a remote judge)."""
        return self


class LocalJudge(Judge):
    """A local causal LM as a judge: chat-formatted prompts, greedy answers of up to ``max_new_tokens``."""

    def __init__(self, model_name: str, max_new_tokens: int = 256, batch_size: int = 16, system: str | None = None,
                 seed: int = 0, model=None, tokenizer=None):
        """``model`` and ``tokenizer``, when given, are used instead of loading ``model_name`` (a study
        that judges with the model it studies shares its weights)."""
        from lantern.models.loading import load_model, load_tokenizer

        require(isinstance(max_new_tokens, int) and max_new_tokens >= 1, self, "max_new_tokens", max_new_tokens, "≥ 1")
        require(isinstance(batch_size, int) and batch_size >= 1, self, "batch_size", batch_size, "≥ 1")
        self.model = model if model is not None else load_model(model_name, seed=seed)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_name)
        self.max_new_tokens, self.batch_size, self.system = max_new_tokens, batch_size, system
        self.key = f"local:{weights_id(model_name, seed)}:{self.tokenizer.fingerprint}:{max_new_tokens}:{system}"

    def to(self, device) -> "LocalJudge":
        self.model.to(device)
        return self

    def answer(self, prompts: Sequence[str]) -> list[str]:
        from lantern.models.generation import Sampling, generate

        out = generate(self.model, self.tokenizer, list(prompts), Sampling(max_new_tokens=self.max_new_tokens),
                       system=self.system, batch_size=self.batch_size)
        return list(out.text)


def weights_id(model_name: str, seed: int) -> str:
    """Names a local model's weights in a cache key: a folder by its resolved path and its weight files'
    sizes and times (so a retrained ``latest/model`` is a new judge); a tiny model by its seed."""
    path = Path(model_name).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        return f"{path.resolve()}:" + ",".join(f"{f.name}={f.stat().st_size}@{f.stat().st_mtime_ns}" for f in files)
    return f"{model_name}:seed{seed}"


class HTTPJudge(Judge):
    """An OpenAI-compatible ``/chat/completions`` endpoint as a judge.

    Transient failures (connection errors, timeouts, HTTP 408/429/5xx, a reply that is not the
    expected JSON) are retried up to ``retries`` times, waiting ``backoff``·2^attempt seconds (with
    jitter) between tries; other HTTP errors (a wrong key, an unknown model) fail at once.
    """

    RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})

    def __init__(self, base_url: str, model: str, api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 4, backoff: float = 1.0, concurrency: int = 8, max_tokens: int = 256,
                 temperature: float = 0.0, system: str | None = None):
        require(base_url.startswith(("http://", "https://")), self, "base_url", base_url, "an http:// or https:// URL")
        require(bool(model), self, "model", model, "the endpoint's model name")
        require(timeout > 0, self, "timeout", timeout, "> 0 seconds")
        require(retries >= 0, self, "retries", retries, "≥ 0")
        require(backoff >= 0, self, "backoff", backoff, "≥ 0 seconds")
        require(concurrency >= 1, self, "concurrency", concurrency, "≥ 1")
        require(max_tokens >= 1, self, "max_tokens", max_tokens, "≥ 1")
        self.api_key = None
        if api_key_env:
            self.api_key = os.environ.get(api_key_env)
            if not self.api_key:
                raise ConfigError(self, "api_key_env", api_key_env, "the name of a set environment variable holding the "
                                  "key (or null for an endpoint without one)")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout, self.retries, self.backoff = model, timeout, retries, backoff
        self.concurrency, self.max_tokens, self.temperature, self.system = concurrency, max_tokens, temperature, system
        self.key = f"http:{self.url}:{model}:{max_tokens}:{temperature}:{system}"

    def answer(self, prompts: Sequence[str]) -> list[str]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, prompts))

    def _one(self, prompt: str) -> str:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": prompt}]
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                           "temperature": self.temperature}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (0.5 + random.random() / 2))
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return _content(reply.read())
            except urllib.error.HTTPError as err:
                last = f"HTTP {err.code} {err.reason}"
                if err.code not in self.RETRY_STATUS:
                    raise JudgeError(f"judge {self.url} ({self.model}): {last}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, ValueError) as err:
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        raise JudgeError(f"judge {self.url} ({self.model}): no answer after {self.retries + 1} tries (last: {last})")


def _content(raw: bytes) -> str:
    """The first choice's message text; anything else is a ValueError (retried as malformed)."""
    reply = json.loads(raw)
    try:
        text = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"not a chat completion: {raw[:120]!r}") from None
    if not isinstance(text, str):
        raise ValueError("the message content is not text")
    return text


class ResponseCache:
    """Answers on disk, one JSON line per (judge, prompt), appended as they arrive."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.answers: dict[str, str] = {}
        self._lock = threading.Lock()
        if self.path.is_file():
            text = self.path.read_text(encoding="utf-8")
            if text and not text.endswith("\n"):  # cut short mid-line: end it, so the next answer starts afresh
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write("\n")
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                    self.answers[record["key"]] = record["answer"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a line cut short by an interruption: asked again

    @staticmethod
    def key(judge: Judge, prompt: str) -> str:
        return hashlib.sha256(f"{judge.key}\x00{prompt}".encode()).hexdigest()

    def add(self, key: str, answer: str) -> None:
        with self._lock:
            self.answers[key] = answer
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, "answer": answer}) + "\n")


def ask(judge: Judge, prompts: Sequence[str], cache: ResponseCache | None = None, chunk: int = 64) -> list[str]:
    """The judge's answer to every prompt; cached answers are reused and new ones saved in chunks of ``chunk``."""
    prompts = list(prompts)
    if not prompts:
        return []
    if cache is None:
        return _answers(judge, prompts)
    keys = [cache.key(judge, p) for p in prompts]
    todo = list(dict.fromkeys(k for k in keys if k not in cache.answers))
    prompt_of = dict(zip(keys, prompts))
    for start in range(0, len(todo), chunk):
        part = todo[start: start + chunk]
        for k, answer in zip(part, _answers(judge, [prompt_of[k] for k in part])):
            cache.add(k, answer)
    return [cache.answers[k] for k in keys]


def _answers(judge: Judge, prompts: list[str]) -> list[str]:
    answers = list(judge.answer(prompts))
    if len(answers) != len(prompts) or not all(isinstance(a, str) for a in answers):
        raise JudgeError(f"judge {judge.key}: {len(answers)} answers for {len(prompts)} prompts (expected one text each)")
    return answers
