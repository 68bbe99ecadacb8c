"""A scripted OpenAI-compatible server for tests of clients (the terminal's tool turns, the web page): a stdlib
HTTP server in the test process whose `POST /v1/chat/completions` streams the next scripted reply.

Replies: ("call", name, arguments) for one tool call; ("text", words, finish_reason, completion_tokens[,
delay_s]) for an answer, streamed in pieces of `piece_chars` characters `delay_s` apart (a slow answer can be
stopped). The script is a list (one reply per request, in order) or a function of the request body. Request
bodies are kept in `requests`; a client that goes away mid-answer is counted in `aborted`. With `keys`, every
request needs `Authorization: Bearer <one of them>` (else 401); with `refuse_tools`, a request with tools is a
400 (as vLLM answers without --enable-auto-tool-choice).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ScriptedServer:

    def __init__(self, script, delay_s: float = 0.0, piece_chars: int = 4, keys: tuple[str, ...] = (),
                 refuse_tools: bool = False):
        self.script, self.requests, self.aborted = script if callable(script) else list(script), [], 0
        self.delay_s, self.piece_chars, self.keys, self.refuse_tools = delay_s, piece_chars, keys, refuse_tools
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def refused(self) -> bool:
                if server.keys and self.headers.get("Authorization", "") not in {f"Bearer {k}" for k in server.keys}:
                    self._send(401, "application/json", b'{"error": {"message": "invalid API key"}}')
                    return True
                return False

            def do_GET(self):
                if self.refused():
                    return
                self._send(200, "application/json", json.dumps({"object": "list", "data": [
                    {"id": "scripted", "object": "model", "owned_by": "test"}]}).encode())

            def do_POST(self):
                if self.refused():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                if server.refuse_tools and body.get("tools"):  # as vLLM without --enable-auto-tool-choice
                    self._send(400, "application/json", b'{"error": {"message": "\\"auto\\" tool choice requires '
                               b'--enable-auto-tool-choice and --tool-call-parser to be set"}}')
                    return
                reply = server.script(body) if callable(server.script) else server.script.pop(0)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                delay_s = reply[4] if reply[0] == "text" and len(reply) > 4 else server.delay_s
                try:
                    for event in server.events(reply[:4], server.piece_chars):
                        self.wfile.write(b"data: " + json.dumps(event, ensure_ascii=False).encode() + b"\n\n")
                        self.wfile.flush()
                        time.sleep(delay_s)
                    self.wfile.write(b"data: [DONE]\n\n")
                except (BrokenPipeError, ConnectionResetError):
                    server.aborted += 1
                self.close_connection = True

            def _send(self, status, content_type, body):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def events(reply: tuple, piece_chars: int = 4) -> list[dict]:
        def chunk(delta, finish=None):
            return {"object": "chat.completion.chunk", "model": "scripted",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if reply[0] == "call":
            _, name, arguments = reply
            call = {"index": 0, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)}}
            return [chunk({"role": "assistant", "tool_calls": [call]}), chunk({}, "tool_calls")]
        _, words, finish, tokens = reply
        pieces = [words[i:i + piece_chars] for i in range(0, len(words), piece_chars)]
        return [chunk({"role": "assistant", "content": piece}) for piece in pieces] + [chunk({}, finish),
                {"object": "chat.completion.chunk", "model": "scripted", "choices": [],
                 "usage": {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}}]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
