"""A work-queue source speaking the book's contract (Designing Distributed Systems, ch. 10):

    GET /api/v1/items          -> {"kind": "ItemList", "apiVersion": "v1", "items": ["name", ...]}
    GET /api/v1/items/<name>   -> {"kind": "Item", "apiVersion": "v1", "data": {...}}

Items are the files `<name>.json` in a folder, read on every request, so a test adds, breaks and
fixes items by writing files. A file holding `{"fail": N}` answers HTTP 503 to its first N
requests (a flaky source), then 200 with that object as data. Standard library only.

usage: python book_source.py ITEMS_DIR
Binds 127.0.0.1 on a free port, prints the port on a line of its own, serves until killed.
"""

import json
import os
import sys
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ITEMS = sys.argv[1]
served = {}


class Source(BaseHTTPRequestHandler):
    def answer(self, status, body):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if path == "/api/v1/items":
            names = sorted(f[:-5] for f in os.listdir(ITEMS) if f.endswith(".json"))
            return self.answer(200, {"kind": "ItemList", "apiVersion": "v1", "items": names})
        prefix = "/api/v1/items/"
        if not path.startswith(prefix):
            return self.answer(404, {"error": "not found"})
        name = urllib.parse.unquote(path[len(prefix):])
        file = os.path.join(ITEMS, name + ".json")
        if "/" in name or not os.path.isfile(file):
            return self.answer(404, {"error": f"no item {name!r}"})
        with open(file, "rb") as f:
            raw = f.read()
        try:
            data = json.loads(raw)
        except ValueError:
            # A broken item: served as it is, not wrapped.
            return self.answer(200, raw)
        if isinstance(data, dict) and "fail" in data:
            served[name] = served.get(name, 0) + 1
            if served[name] <= data["fail"]:
                return self.answer(503, {"error": "try again"})
        return self.answer(200, {"kind": "Item", "apiVersion": "v1", "data": data})

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Source)
print(server.server_address[1], flush=True)
server.serve_forever()
