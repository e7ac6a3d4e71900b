"""Open WebUI against an OpenAI-compatible backend: its default chat flow, driven headless.

Run with the Python of `.venv-openwebui` (it has Open WebUI, httpx and python-socketio):

    .venv-openwebui/bin/python scripts/compat_openwebui.py compat --backend-python .venv/bin/python
    .venv-openwebui/bin/python scripts/compat_openwebui.py record --out tests/fixtures/openwebui

`compat` starts our backend (`python -m backend`, the embedded model) and, in front of it,
`scripts/record_openwebui.py --forward` (which logs each request and the backend's answer);
`record` starts `scripts/record_openwebui.py` alone, as the backend. Then both start Open WebUI
in a temporary DATA_DIR with its default settings (only the OpenAI connection set, plus what
keeps it offline), sign up the first user (the admin) through its API, and send two messages in
a new chat the way its web frontend does: a socket.io session, then
`POST /api/chat/completions` with the frontend's fields (`session_id`, `id`, `message_ids`,
`parent_id`, `user_message`, `background_tasks`, ...). Open WebUI then calls the backend for
each reply and for its background tasks (title, tags, follow-ups). The report says per step
what came back, and lists the requests the backend got with its answers; the exit status is 1
when a chat turn got no assistant reply. Every process started here is stopped before exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import socketio

REPO = Path(__file__).resolve().parent.parent
# The first message opens a chat; the second, in the same chat, asks for what a built-in tool
# tells (the recorder answers it with a tool call, a real model may or may not).
PROMPTS = [
    "What is the capital of France? Answer in one short sentence.",
    "What is the current Unix timestamp?",
]
ADMIN = {"name": "Compat Admin", "email": "admin@example.com", "password": "compat-password-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Service:
    """A subprocess in a session of its own, logged to a file; stop() ends its whole group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path):
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        print(f"[{name}] started pid {self.process.pid}, log {log}", flush=True)

    def wait_ready(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited ({self.process.returncode}); see {self.log}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            time.sleep(1)
        raise TimeoutError(
            f"{self.name} not ready at {url} after {timeout_s:.0f} s; see {self.log}"
        )

    def stop(self) -> None:
        """SIGINT (the backend shuts Ray down on it), then SIGKILL whatever is left of the group."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # stragglers of this session only
        print(f"[{self.name}] stopped", flush=True)


def openwebui_env(base_url: str, api_key: str, data_dir: Path) -> dict[str, str]:
    """Open WebUI's defaults, but for the one connection and what keeps it from downloading."""
    return {
        "DATA_DIR": str(data_dir),
        # Required with auth on; `open-webui serve` would otherwise write a key file in the cwd.
        "WEBUI_SECRET_KEY": uuid.uuid4().hex,
        "OPENAI_API_BASE_URL": base_url,
        "OPENAI_API_KEY": api_key,
        "ENABLE_OLLAMA_API": "False",
        # Offline: no model downloads at start (the default local embedding model is then absent,
        # which Open WebUI logs and goes on without), no pip installs for plugins.
        "OFFLINE_MODE": "True",
        "HF_HUB_OFFLINE": "1",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "False",
        "RAG_RERANKING_MODEL_AUTO_UPDATE": "False",
        "WHISPER_MODEL_AUTO_UPDATE": "False",
        "ANONYMIZED_TELEMETRY": "False",
        "DO_NOT_TRACK": "True",
        "SCARF_NO_ANALYTICS": "True",
    }


def frontend_body(
    model: dict[str, Any],
    user: dict[str, Any],
    session_id: str,
    prompt: str,
    chat_id: str | None = None,
    parent_id: str | None = None,
) -> dict[str, Any]:
    """The body Open WebUI 0.12.4's Chat.svelte (sendMessageSocket) sends for a message with
    default settings: no system prompt, no tools or files selected, web search and image
    generation off, memory on (the server's enable_memories default). The first message of a new
    chat has no chat_id (the server creates the chat) and asks for a title and tags; every
    message asks for follow-ups. Fields the frontend leaves undefined are absent, as
    JSON.stringify drops them; the key order is the frontend's."""
    user_message_id = str(uuid.uuid4())
    response_message_id = str(uuid.uuid4())
    now = datetime.now().astimezone()
    body: dict[str, Any] = {
        "stream": True,
        "model": model["id"],
        "params": {"model_controls": {}},
        "tool_ids": [],
        "tool_servers": [],
        "features": {
            "voice": False,
            "image_generation": False,
            "code_interpreter": False,
            "web_search": False,
            "memory": True,
        },
        "variables": {
            "{{USER_NAME}}": user["name"],
            "{{USER_EMAIL}}": user["email"],
            "{{USER_LOCATION}}": "Unknown",
            "{{CURRENT_DATETIME}}": now.strftime("%Y-%m-%d %H:%M:%S"),
            "{{CURRENT_DATE}}": now.strftime("%Y-%m-%d"),
            "{{CURRENT_TIME}}": now.strftime("%H:%M:%S"),
            "{{CURRENT_WEEKDAY}}": now.strftime("%A"),
            "{{CURRENT_TIMEZONE}}": os.environ.get("TZ", "UTC"),
            "{{USER_LANGUAGE}}": "en-US",
        },
    }
    if chat_id is None:
        body["chat_variables"] = {}
    body["model_item"] = model
    body["session_id"] = session_id
    if chat_id is not None:
        body["chat_id"] = chat_id
    body["id"] = response_message_id
    body["message_ids"] = [
        {"model_id": model["id"], "message_id": response_message_id, "modelIdx": 0}
    ]
    body["parent_id"] = parent_id
    body["user_message"] = {
        "id": user_message_id,
        "parentId": parent_id,
        "childrenIds": [response_message_id],
        "role": "user",
        "user": {"id": user["id"], "name": user["name"]},
        "user_id": user["id"],
        "content": prompt,
        "timestamp": int(time.time()),
        "models": [model["id"]],
    }
    tasks = {"title_generation": True, "tags_generation": True} if chat_id is None else {}
    body["background_tasks"] = {**tasks, "follow_up_generation": True}
    return body


def _event_type(event: dict[str, Any]) -> str | None:
    return (event.get("data") or {}).get("type")


def _event_data(event: dict[str, Any]) -> Any:
    return (event.get("data") or {}).get("data")


async def drive(base: str, prompts: list[str], timeout_s: float) -> dict[str, Any]:
    """Sign up, open a socket.io session, send each prompt in one chat; collect what comes back."""
    events: list[dict[str, Any]] = []
    got_event = asyncio.Event()
    out: dict[str, Any] = {"events": events, "turns": []}
    headers = {"User-Agent": "compat_openwebui.py"}
    async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as http:
        r = await http.post("/api/v1/auths/signup", json=ADMIN)
        r.raise_for_status()
        user = r.json()
        auth = {"Authorization": f"Bearer {user['token']}"}
        # What the frontend loads before a chat: its config, the user's settings, the models.
        for path in ("/api/config", "/api/v1/users/user/settings"):
            (await http.get(path, headers=auth)).raise_for_status()
        r = await http.get("/api/models", headers=auth)
        r.raise_for_status()
        models = r.json()["data"]
        if not models:
            raise RuntimeError("Open WebUI lists no model: is the backend's /v1/models reachable?")
        model = models[0]
        out["model"] = model["id"]

        sio = socketio.AsyncClient()

        @sio.on("events")
        async def on_event(data: dict[str, Any]) -> None:
            events.append(data)
            got_event.set()

        async def wait_for(condition: Any, seconds: float) -> bool:
            deadline = time.monotonic() + seconds
            while not condition():
                if time.monotonic() >= deadline:
                    return False
                got_event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(got_event.wait(), timeout=1)
            return True

        await sio.connect(
            base,
            socketio_path="/ws/socket.io",
            transports=["websocket"],
            auth={"token": user["token"]},
        )
        chat_id: str | None = None
        parent_id: str | None = None
        try:
            await sio.emit("user-join", {"auth": {"token": user["token"]}})
            for prompt in prompts:
                body = frontend_body(model, user, sio.get_sid() or "", prompt, chat_id, parent_id)
                message_id = body["id"]
                r = await http.post("/api/chat/completions", json=body, headers=auth)
                turn: dict[str, Any] = {
                    "prompt": prompt,
                    "frontend_request": body,
                    "http_status": r.status_code,
                    "http_response": r.json() if r.content else None,
                }
                out["turns"].append(turn)
                chat_id = chat_id or (turn["http_response"] or {}).get("chat_id")
                if r.status_code != 200 or not chat_id:
                    break

                def mine(kind: str, message_id: str = message_id) -> list[dict[str, Any]]:
                    return [
                        e
                        for e in events
                        if e.get("message_id") == message_id and _event_type(e) == kind
                    ]

                def done() -> bool:
                    # A reply ends with a chat:completion that says done; a failed one (the
                    # backend refused it) with chat:message:error, and then no task runs after it.
                    return bool(mine("chat:message:error")) or any(
                        isinstance(d := _event_data(e), dict) and (d.get("done") or d.get("error"))
                        for e in mine("chat:completion")
                    )

                finished = await wait_for(done, timeout_s)
                failed = (
                    not finished
                    or bool(mine("chat:message:error"))
                    or any(
                        isinstance(d := _event_data(e), dict) and d.get("error")
                        for e in mine("chat:completion")
                    )
                )
                turn["failed"] = failed
                # The title task starts with the chat, beside the reply, and runs whatever the
                # reply becomes; tags and follow-ups run only after a reply, so a failed one has
                # none to wait for.
                wanted = [] if failed else ["chat:message:follow_ups"]
                if "title_generation" in body["background_tasks"]:
                    wanted += ["chat:title"] if failed else ["chat:title", "chat:tags"]
                await wait_for(lambda wanted=wanted: all(mine(k) for k in wanted), timeout_s)
                await asyncio.sleep(2)  # let the last database writes land
                parent_id = message_id
        finally:
            await sio.disconnect()
        out["chat_id"] = chat_id
        if chat_id:
            r = await http.get(f"/api/v1/chats/{chat_id}", headers=auth)
            out["chat"] = r.json() if r.status_code == 200 else None
            r = await http.get(f"/api/v1/chats/{chat_id}/tags", headers=auth)
            out["tags"] = r.json() if r.status_code == 200 else None
    return out


def not_run(turn: dict[str, Any]) -> str:
    return " (not run: Open WebUI runs this task only after a reply)" if turn.get("failed") else ""


def report(result: dict[str, Any]) -> bool:
    """Print one line per step; True when every turn's chat step got an assistant reply."""
    chat = (result.get("chat") or {}).get("chat") or {}
    messages = (chat.get("history") or {}).get("messages") or {}
    print(f"model: {result.get('model')}")
    all_ok = bool(result["turns"])
    for number, turn in enumerate(result["turns"], 1):
        message_id = turn["frontend_request"]["id"]
        message = messages.get(message_id) or {}
        content = message.get("content") or ""
        error = message.get("error")
        errors = [
            d["error"]
            for e in result["events"]
            if e.get("message_id") == message_id
            and _event_type(e) in ("chat:completion", "chat:message:error")
            and isinstance(d := _event_data(e), dict)
            and d.get("error")
        ]
        tools = [
            item.get("name")
            for item in message.get("output") or []
            if item.get("type") == "function_call"
        ]
        print(f"turn {number}: {turn['prompt']!r}")
        print(
            f"  POST /api/chat/completions -> {turn['http_status']} "
            f"{json.dumps(turn['http_response'])}"
        )
        ok = bool(content.strip()) and not error
        all_ok = all_ok and ok
        print(f"  step chat: {'OK' if ok else 'FAIL'}: content={content!r}")
        if error or errors:
            print(f"    error: {json.dumps(error or errors[0])}")
        if tools:
            print(f"    tools called: {tools}")
        if number == 1:
            title = chat.get("title")
            generated = bool(title) and title not in ("New Chat", turn["prompt"])
            note = (
                ""
                if generated
                else " (Open WebUI's default or its fallback, the user's message: the title"
                " request failed or its answer held no JSON title)"
            )
            print(f"  step title: {'OK' if generated else 'FAIL'}: title={title!r}{note}")
            tags = [
                t.get("name", t) if isinstance(t, dict) else t for t in result.get("tags") or []
            ]
            print(f"  step tags: {'OK' if tags else 'FAIL'}: tags={tags!r}{not_run(turn)}")
        follow_ups = message.get("followUps")
        print(
            f"  step follow_ups: {'OK' if follow_ups else 'FAIL'}: "
            f"follow_ups={follow_ups!r}{not_run(turn)}"
        )
    return all_ok


def report_backend(requests_log: Path) -> None:
    """One line per request Open WebUI sent the backend, with what the backend answered."""
    print("requests Open WebUI sent the backend (logged by the recorder in between):")
    if not requests_log.exists():
        print("  none")
        return
    for line in requests_log.read_text().splitlines():
        entry = json.loads(line)
        body = entry.get("body") if isinstance(entry.get("body"), dict) else {}
        fields = [k for k in body if k not in ("model", "messages")]
        response = entry.get("response") or {}
        answer = {k: v for k, v in response.items() if k != "status" and v not in (None, [], "")}
        text = json.dumps(answer)
        if len(text) > 300:
            text = text[:300] + "...(cut)"
        print(
            f"  {entry['seq']}. {entry['kind']}: {entry['method']} {entry['path']} "
            f"fields={fields} -> {response.get('status')} {text}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["compat", "record"])
    parser.add_argument("--backend-python", default=str(REPO / ".venv/bin/python"))
    parser.add_argument(
        "--backend-url", help="use a running backend (its /v1) instead of starting one"
    )
    parser.add_argument("--api-key", default="sk-compat-not-checked")
    parser.add_argument("--out", type=Path, default=REPO / "tests/fixtures/openwebui")
    parser.add_argument(
        "--prompt",
        action="append",
        help="a user message (repeat for more turns in the chat); default: the two of PROMPTS",
    )
    parser.add_argument(
        "--timeout", type=float, default=300, help="seconds for the reply and tasks"
    )
    parser.add_argument("--logs", type=Path, default=REPO / "artifacts/openwebui")
    parser.add_argument("--dump", type=Path, help="write the whole result (events, chat) as JSON")
    args = parser.parse_args()

    services: list[Service] = []
    args.logs.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="openwebui-") as tmp:
            requests_log = args.logs / "requests.jsonl"
            requests_log.unlink(missing_ok=True)
            if args.mode == "compat" and not args.backend_url:
                port = free_port()
                backend_url = f"http://127.0.0.1:{port}"
                backend = Service(
                    "backend",
                    [args.backend_python, "-m", "backend"],
                    {
                        "LLM_PORT": str(port),
                        "LLM_METRICS_PORT": str(free_port()),
                        "PYTHONPATH": str(REPO),
                        "HF_HUB_OFFLINE": "1",
                        "RAY_USAGE_STATS_ENABLED": "0",
                        "RAY_AUTH_MODE": "disabled",
                    },
                    args.logs / "backend.log",
                    REPO,
                )
                services.append(backend)
                backend.wait_ready(f"{backend_url}/healthz", 600)
            elif args.mode == "compat":
                backend_url = args.backend_url.rstrip("/").removesuffix("/v1")
            # Between Open WebUI and the backend, the recorder: it answers itself (record), or
            # passes each request on and logs what the backend answered (compat).
            port = free_port()
            base_url = f"http://127.0.0.1:{port}/v1"
            recorder_argv = [
                sys.executable,
                str(REPO / "scripts/record_openwebui.py"),
                "--port",
                str(port),
                "--log",
                str(requests_log),
            ]
            if args.mode == "record":
                recorder_argv += ["--out", str(args.out)]
            else:
                recorder_argv += ["--forward", backend_url]
            recorder = Service("recorder", recorder_argv, {}, args.logs / "recorder.log", REPO)
            services.append(recorder)
            recorder.wait_ready(f"http://127.0.0.1:{port}/healthz", 30)
            owui_port = free_port()
            owui = Service(
                "open-webui",
                [
                    str(Path(sys.executable).parent / "open-webui"),
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(owui_port),
                ],
                openwebui_env(base_url, args.api_key, Path(tmp) / "data"),
                args.logs / "open-webui.log",
                Path(tmp),
            )
            services.append(owui)
            owui_url = f"http://127.0.0.1:{owui_port}"
            owui.wait_ready(f"{owui_url}/health", 300)
            print(f"Open WebUI on {owui_url}, its OpenAI connection {base_url}", flush=True)
            result = asyncio.run(drive(owui_url, args.prompt or PROMPTS, args.timeout))
            if args.dump:
                args.dump.write_text(json.dumps(result, indent=2) + "\n")
            ok = report(result)
            if args.mode == "compat":
                report_backend(requests_log)
    finally:
        for service in reversed(services):
            service.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
