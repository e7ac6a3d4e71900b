"""A tiny OpenAI-shaped server that records what a client (Open WebUI) sends it.

    python3 scripts/record_openwebui.py --port 8701 --out tests/fixtures/openwebui --log req.jsonl

It answers `GET /v1/models` with one model and `POST /v1/chat/completions` with a fixed reply,
streamed (SSE) or whole as the request asks; a task request (title, tags, follow-ups, ...) gets
the JSON its prompt asks for, so the client's task succeeds; a user message asking for the
"Unix timestamp" gets a call of the client's `get_current_timestamp` tool, so the request that
brings the tool's result back is recorded too. Every request is appended to the log (one JSON
object a line); the first request of each kind is also written to `<out>/<kind>.json`, its body
exactly as received. With `--forward URL` it answers nothing itself: it passes each request to a
real backend and its answer back, and logs a summary of the answer with the request. Standard
library only, so any python3 runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

MODEL_ID = "recorder-model"
CHAT_REPLY = "Hello from the recording server."
# A user message asking for this gets a call of the tool (when the request offers it), so the
# client's tool round trip is recorded too; the request that carries the result gets TOOL_REPLY.
TOOL_TRIGGER = "Unix timestamp"
TOOL_NAME = "get_current_timestamp"
TOOL_CALL_ID = "call_recorder_1"
TOOL_REPLY = "That is the current Unix timestamp."

# Each default task prompt of Open WebUI 0.12 opens with "### Task:" and a sentence of its own.
TASK_MARKERS = {
    "title": "Generate a concise title summarizing the chat history",
    "tags": "Generate 1-3 broad tags categorizing the main themes",
    "follow_ups": "Predict 3-5 useful messages this user might naturally send next",
    "queries": "determine the necessity of generating search queries",
    "autocomplete": "You are an autocompletion system",
    "image_prompt": "Generate a detailed prompt for am image generation task",
}
TASK_REPLIES = {
    "title": '{"title": "Recorder test chat"}',
    "tags": '{"tags": ["General", "Testing"]}',
    "follow_ups": '{"follow_ups": ["What else can you do?", "Tell me more."]}',
    "queries": '{"queries": []}',
    "autocomplete": '{"text": ""}',
    "image_prompt": "A plain test image.",
}
# Headers that tell nothing about the client (the transport's own) are left out of a record.
SKIPPED_HEADERS = {"host", "content-length", "connection", "accept-encoding"}


def _texts(body: dict[str, Any]) -> str:
    """All the text of a chat request's messages, to find which task it is."""
    out = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(p.get("text", "") for p in content if isinstance(p, dict))
    return "\n".join(out)


def wants_tool_call(body: dict[str, Any]) -> bool:
    """The last message is the user's, asks for TOOL_TRIGGER, and the request offers TOOL_NAME."""
    messages = body.get("messages") or []
    offered = {(t.get("function") or {}).get("name") for t in body.get("tools") or []}
    return (
        bool(messages)
        and messages[-1].get("role") == "user"
        and TOOL_TRIGGER in _texts({"messages": messages[-1:]})
        and TOOL_NAME in offered
    )


def classify(method: str, path: str, body: Any) -> str:
    if method == "GET" and path.rstrip("/").endswith("/models"):
        return "models"
    if method == "POST" and path.endswith("/chat/completions") and isinstance(body, dict):
        text = _texts(body)
        for kind, marker in TASK_MARKERS.items():
            if marker in text:
                return kind
        messages = body.get("messages") or []
        if any(m.get("role") == "tool" for m in messages):
            return "chat_tool_result"
        if "### Task:" in text:
            return "task_other"
        if any(m.get("role") == "assistant" for m in messages):
            return "chat_second_turn"
        return "chat"
    return f"{method.lower()}_{path.strip('/').replace('/', '_') or 'root'}"


class Recorder:
    def __init__(self, out: Path | None, log: Path | None) -> None:
        self.out = out
        self.log = log
        self.lock = threading.Lock()
        self.seen: dict[str, int] = {}

    def record(self, kind: str, entry: dict[str, Any]) -> None:
        with self.lock:
            self.seen[kind] = self.seen.get(kind, 0) + 1
            entry = {"kind": kind, "seq": sum(self.seen.values()), **entry}
            if self.log:
                with self.log.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
            if self.out and self.seen[kind] == 1:
                self.out.mkdir(parents=True, exist_ok=True)
                path = self.out / f"{kind}.json"
                path.write_text(json.dumps(entry, indent=2, ensure_ascii=False) + "\n")
        print(f"recorded {entry['method']} {entry['path']} as {kind}", flush=True)


def make_handler(recorder: Recorder, upstream: str | None = None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _entry(self, body: Any) -> dict[str, Any]:
            headers = {
                k.lower(): v for k, v in self.headers.items() if k.lower() not in SKIPPED_HEADERS
            }
            return {"method": self.command, "path": self.path, "headers": headers, "body": body}

        def _send_json(self, status: int, payload: Any) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/healthz":  # the driver's readiness probe: not the client's
                self._send_json(200, {"status": "ok"})
                return
            if upstream:
                self._forward(classify("GET", self.path, None), None, b"")
                return
            kind = classify("GET", self.path, None)
            recorder.record(kind, self._entry(None))
            if kind == "models":
                model = {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "recorder"}
                self._send_json(200, {"object": "list", "data": [model]})
            else:
                self._send_json(404, {"error": {"message": "not found", "type": "not_found"}})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
            kind = classify("POST", self.path, body)
            if upstream:
                self._forward(kind, body, raw)
                return
            recorder.record(kind, self._entry(body))
            if not self.path.endswith("/chat/completions") or not isinstance(body, dict):
                self._send_json(404, {"error": {"message": "not found", "type": "not_found"}})
                return
            call = wants_tool_call(body)
            text = TOOL_REPLY if kind == "chat_tool_result" else TASK_REPLIES.get(kind, CHAT_REPLY)
            if body.get("stream"):
                self._stream(body, "" if call else text, call)
            else:
                self._send_json(200, self._completion(body, text, call))

        def _forward(self, kind: str, body: Any, raw: bytes) -> None:
            """Pass the request to the upstream and its answer back (SSE as it comes), then
            record the request with a summary of the answer."""
            assert upstream is not None
            url = urllib.parse.urlsplit(upstream)
            conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=900)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in SKIPPED_HEADERS}
            conn.request(self.command, self.path, body=raw or None, headers=headers)
            resp = conn.getresponse()
            self.send_response(resp.status)
            content_type = resp.getheader("Content-Type", "")
            self.send_header("Content-Type", content_type)
            response: dict[str, Any] = {"status": resp.status}
            if content_type.startswith("text/event-stream"):
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                lines = []
                for line in resp:
                    self.wfile.write(line)
                    self.wfile.flush()
                    lines.append(line.decode(errors="replace"))
                response.update(_summarize_sse(lines))
            else:
                data = resp.read()
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                response.update(_summarize_json(data))
            conn.close()
            recorder.record(kind, {**self._entry(body), "response": response})

        def _completion(self, body: dict[str, Any], text: str, call: bool) -> dict[str, Any]:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if call:
                message = {"role": "assistant", "content": None, "tool_calls": [_tool_call()]}
            return {
                "id": "chatcmpl-recorder",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", MODEL_ID),
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if call else "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }

        def _stream(self, body: dict[str, Any], text: str, call: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            base = {
                "id": "chatcmpl-recorder",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": body.get("model", MODEL_ID),
            }
            pieces: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
            if call:
                first, arguments = _tool_call(), "{}"
                first["function"]["arguments"] = ""
                pieces.append({"tool_calls": [{"index": 0, **first}]})
                pieces.append({"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]})
            else:
                pieces += [{"content": w} for w in _words(text)]
            chunks = [
                {**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
                for d in pieces
            ]
            finish = "tool_calls" if call else "stop"
            chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
                chunks.append({**base, "choices": [], "usage": usage})
            for chunk in chunks:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def _summarize_json(data: bytes) -> dict[str, Any]:
    """An upstream's whole answer, in short: its reply's text, finish and tool calls, or error."""
    try:
        payload = json.loads(data)
    except ValueError:
        return {"text": data.decode(errors="replace")[:2000]}
    if not isinstance(payload, dict):
        return {}
    if "error" in payload:
        return {"error": payload["error"]}
    choices = payload.get("choices") or []
    if not choices:
        return {"models": [m.get("id") for m in payload.get("data") or []]}
    message = choices[0].get("message") or {}
    return {
        "content": message.get("content"),
        "tool_calls": message.get("tool_calls"),
        "finish_reason": choices[0].get("finish_reason"),
        "usage": payload.get("usage"),
    }


def _summarize_sse(lines: list[str]) -> dict[str, Any]:
    """A streamed answer, joined: the text, the tool calls' names, the finish and any error."""
    content, names, finish, error = [], [], None, None
    for line in lines:
        if not line.startswith("data: ") or line.strip() == "data: [DONE]":
            continue
        try:
            chunk = json.loads(line[6:])
        except ValueError:
            continue
        error = chunk.get("error", error)
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            content.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:
                if (call.get("function") or {}).get("name"):
                    names.append(call["function"]["name"])
            finish = choice.get("finish_reason") or finish
    summary = {"content": "".join(content), "tool_calls": names, "finish_reason": finish}
    return {**summary, "error": error} if error else summary


def _tool_call() -> dict[str, Any]:
    return {
        "id": TOOL_CALL_ID,
        "type": "function",
        "function": {"name": TOOL_NAME, "arguments": "{}"},
    }


def _words(text: str) -> list[str]:
    """The text in word-sized deltas that join back to it exactly."""
    words = text.split(" ")
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8701)
    parser.add_argument("--out", type=Path, help="write the first request of each kind here")
    parser.add_argument("--log", type=Path, help="append every request here (JSON lines)")
    parser.add_argument(
        "--forward",
        metavar="URL",
        help="a real backend (http://host:port): pass every request to it and its answers back, "
        "recording both, instead of answering",
    )
    args = parser.parse_args()
    handler = make_handler(Recorder(args.out, args.log), args.forward)
    server = ThreadingHTTPServer((args.host, args.port), handler)
    print(f"recording on http://{args.host}:{args.port}/v1", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
