"""The browser call test's signaling server (stdlib only), run inside the server's namespace.

    python3 signal.py HOST PORT HOOK_URL

Serves call.html, and passes SDP between the caller page, the adapter's hook
and the server page:

    POST /offer        caller: its offer SDP; the answer comes back as JSON
                       {"answer", "ufrag"} once the server page has answered
                       (the offer goes through hook /v1/offer, the answer
                       through hook /v1/answer)
    GET  /next-offer   server page: the next offer for it (204 after 20 s idle)
    POST /answer       server page: its answer SDP
    POST /stats/ROLE   a page's final report: printed as one JSON line on stdout
    GET  /stop         server page: returns once the caller has reported

Every wait is bounded (a page that hangs gets 504 / 204, not a stuck thread).
"""

import http.server
import json
import queue
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

PAGE = (Path(__file__).parent / "call.html").read_bytes()
WAIT = 20.0

offers = queue.Queue()          # stripped offers for the server page
answers = queue.Queue()         # the server page's answers
caller_done = threading.Event()
lock = threading.Lock()         # one negotiation at a time


def hook(path, body, ctype):
    req = urllib.request.Request(HOOK + path, data=body.encode(), headers={"Content-Type": ctype}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, status, body=b"", ctype="text/plain"):
        body = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        return self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/call.html":
            return self.reply(200, PAGE, "text/html")
        if path == "/next-offer":
            try:
                return self.reply(200, offers.get(timeout=WAIT), "application/sdp")
            except queue.Empty:
                return self.reply(204)
        if path == "/stop":
            caller_done.wait(120)
            return self.reply(200, "stop")
        return self.reply(404)

    def do_POST(self):
        body = self.body()
        if self.path == "/offer":
            try:
                return self.negotiate(body)
            except urllib.error.HTTPError as exc:
                reason = exc.read().decode().strip()
                print(json.dumps({"event": "hook-error", "status": exc.code, "reason": reason}), flush=True)
                return self.reply(502, f"adapter hook: {exc.code} {reason}")
        if self.path == "/answer":
            answers.put(body)
            return self.reply(200, "ok")
        if self.path.startswith("/stats/"):
            role = self.path[len("/stats/"):]
            print(json.dumps({"event": "stats", "role": role, "report": json.loads(body)}), flush=True)
            if role == "caller":
                caller_done.set()
            return self.reply(200, "ok")
        return self.reply(404)

    def negotiate(self, body):
        with lock:
            offers.put(hook("/v1/offer", body, "application/sdp"))
            try:
                answer = answers.get(timeout=WAIT)
            except queue.Empty:
                return self.reply(504, "server page did not answer")
            doc = hook("/v1/answer", json.dumps({"offer": body, "answer": answer}), "application/json")
            print(json.dumps({"event": "negotiated", "answer": json.loads(doc)["answer"],
                              "server_answer": answer, "offer": body}), flush=True)
            return self.reply(200, doc, "application/json")


if __name__ == "__main__":
    host, port, HOOK = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    srv = http.server.ThreadingHTTPServer((host, port), H)
    srv.daemon_threads = True
    print(json.dumps({"event": "ready", "port": srv.server_address[1]}), flush=True)
    srv.serve_forever()
