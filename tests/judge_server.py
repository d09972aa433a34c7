"""A scripted OpenAI-compatible judge server on 127.0.0.1 (free port) for the judge and scorer tests.

``POST /v1/chat/completions`` reads the judge prompt (``<response>``, ``<criterion>`` / ``<criteria>``) and
answers in the requested format. The default verdict: a criterion is met iff the *last word* of its text
(lower case, no punctuation) occurs in the response; the holistic rating is 1 + 9 * (fraction met); a pairwise
prompt (``<response_A>`` / ``<response_B>``) is won by the response meeting more of the listed criteria.

Faults (per request, seeded): ``p_429`` (with ``Retry-After``), ``p_500``, ``p_timeout`` (sleeps past the
client timeout), ``p_malformed`` (reply content that is not the requested JSON), ``p_drop`` (closes the
connection without answering), ``p_bad_body`` (HTTP body that is not JSON). ``script`` is a list of forced
behaviours for the next requests (``"429"``, ``"500"``, ``"timeout"``, ``"malformed"``, ``"drop"``,
``"bad_body"``, ``"missing"`` (batch: leave one id out), ``"duplicate"``, ``"ok"``). A response containing
``POISON`` always gets HTTP 500. ``latency_s`` is added to every answer.

Plain asyncio (no web framework) in a daemon thread with its own loop.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import string
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable


def last_word(text: str) -> str:
    words = text.lower().translate(str.maketrans("", "", string.punctuation)).split()
    return words[-1] if words else ""


def default_verdict(criterion_text: str, response: str) -> bool:
    return last_word(criterion_text) in response.lower()


@dataclass
class Faults:
    p_429: float = 0.0
    p_500: float = 0.0
    p_timeout: float = 0.0
    p_malformed: float = 0.0
    p_drop: float = 0.0
    p_bad_body: float = 0.0
    retry_after: float = 0.05
    timeout_sleep_s: float = 2.0


@dataclass
class JudgeServer:
    latency_s: float = 0.0
    faults: Faults = field(default_factory=Faults)
    seed: int = 0
    verdict: Callable[[str, str], bool] = default_verdict
    script: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.counts: Counter = Counter()
        self.auth_headers: list[str] = []
        self.bodies: list[dict] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server = None
        self.port = 0

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self) -> JudgeServer:
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)

            async def boot():
                self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=1024)
                self.port = self._server.sockets[0].getsockname()[1]
                ready.set()

            self._loop.run_until_complete(boot())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name="judge-server")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("judge test server did not start")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self._loop is None:
            return

        async def shut():
            self._server.close()
            for t in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                t.cancel()

        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------------------------------ HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for ln in lines[1:]:
                    if ":" in ln:
                        k, v = ln.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep = await self._respond(lines[0], headers, body, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass

    @staticmethod
    async def _send(writer, status: int, payload: bytes, extra: dict | None = None) -> None:
        reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error"}.get(status, "X")
        hdr = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(payload)}"]
        hdr += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(hdr) + "\r\n\r\n").encode() + payload)
        await writer.drain()

    def _pick_fault(self, response_text: str) -> str:
        if "POISON" in response_text:
            return "500"
        if self.script:
            return self.script.pop(0)
        f = self.faults
        r = self.rng.random()
        for name, p in (("429", f.p_429), ("500", f.p_500), ("timeout", f.p_timeout), ("malformed", f.p_malformed),
                        ("drop", f.p_drop), ("bad_body", f.p_bad_body)):
            if r < p:
                return name
            r -= p
        return "ok"

    async def _respond(self, request_line: str, headers: dict, body: bytes, writer) -> bool:
        self.counts["requests"] += 1
        if not request_line.startswith("POST") or "/chat/completions" not in request_line:
            await self._send(writer, 404, b'{"error": "not found"}')
            return True
        if "authorization" in headers:
            self.auth_headers.append(headers["authorization"])
        req = json.loads(body)
        self.bodies.append(req)
        user = [m["content"] for m in req["messages"] if m["role"] == "user"][0]
        resp_m = re.search(r"<response>\n(.*?)\n</response>", user, re.S)
        response_text = resp_m.group(1) if resp_m else ""
        fault = self._pick_fault(response_text)
        self.counts[fault] += 1
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if fault == "429":
            await self._send(writer, 429, b'{"error": "rate limited"}', {"Retry-After": f"{self.faults.retry_after:g}"})
            return True
        if fault == "500":
            await self._send(writer, 500, b'{"error": "boom"}')
            return True
        if fault == "timeout":
            await asyncio.sleep(self.faults.timeout_sleep_s)
            return False
        if fault == "drop":
            return False
        if fault == "bad_body":
            await self._send(writer, 200, b'{"choices": [ this is not json')
            return True
        content = self._content(user, response_text, fault)
        payload = {"id": "x", "object": "chat.completion", "model": req.get("model"),
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": len(content) // 4}}
        await self._send(writer, 200, json.dumps(payload).encode())
        return True

    def _content(self, user: str, response_text: str, fault: str) -> str:
        if fault == "malformed":
            return "I think the criterion is met, {criteria_met: yes"
        pair = re.search(r"<response_A>\n(.*?)\n</response_A>\s*<response_B>\n(.*?)\n</response_B>", user, re.S)
        if pair:  # pairwise: the response meeting more criteria (by the default verdict) wins
            listed = re.findall(r"^- (.*) \[weight", user, re.M)
            met = [sum(self.verdict(t, r) for t in listed) for r in pair.groups()]
            winner = "tie" if met[0] == met[1] else ("A" if met[0] > met[1] else "B")
            return json.dumps({"explanation": "scripted", "winner": winner})
        crit = re.search(r"<criterion>\n(.*?)\n</criterion>", user, re.S)
        if crit:
            met = self.verdict(crit.group(1), response_text)
            return json.dumps({"explanation": "scripted", "criteria_met": met})
        block = re.search(r"<criteria>\n(.*?)\n</criteria>", user, re.S)
        items = []
        for ln in block.group(1).splitlines() if block else []:
            m = re.match(r"\[(.+?)\] (.*)", ln)
            if m:
                items.append((m.group(1), m.group(2)))
            else:
                m = re.match(r"- (.*) \[weight", ln)
                if m:
                    items.append((None, m.group(1)))
        if "rating" in user.split("</criteria>")[-1]:
            frac = sum(self.verdict(t, response_text) for _, t in items) / max(1, len(items))
            return "<think>let me rate</think>" + json.dumps({"explanation": "scripted", "rating": round(1 + 9 * frac)})
        out = [{"criterion_id": cid, "explanation": "scripted", "criteria_met": self.verdict(t, response_text)}
               for cid, t in items]
        if fault == "missing" and out:
            out = out[1:]
        if fault == "duplicate" and out:
            out = out + [dict(out[0], criteria_met=not out[0]["criteria_met"])]
        return "```json\n" + json.dumps(out) + "\n```"
