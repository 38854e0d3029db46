"""A W&B server on this machine for the login check: it knows one key (or none) and refuses every other, as W&B's
own does, with HTTP 401 and a GraphQL error."""

import base64
import contextlib
import http.server
import json
import threading
from urllib.parse import urlsplit

KEY = "0123456789abcdefghij0123456789abcdefghij"  # the form of a W&B key: 40 characters


@contextlib.contextmanager
def wandb_server(known_key: str | None = None):
    """The server's URL, for WANDB_BASE_URL, while it runs; it answers POST /graphql only (404 elsewhere)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            sent = base64.b64encode(f"api:{known_key}".encode()).decode() if known_key else None
            if urlsplit(self.path).path != "/graphql":  # a proxy gets the whole URL as the path
                status, answer = 404, {}
            elif sent and self.headers.get("Authorization") == f"Basic {sent}":
                status, answer = 200, {"data": {"viewer": {"id": "VXNlcjox"}}}
            else:
                status, answer = 401, {"errors": [{"message": "user is not logged in"}]}
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(answer).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
