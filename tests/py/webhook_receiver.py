"""A webhook receiver that checks Standard Webhooks signatures with the `standardwebhooks` PyPI
library, an implementation mediaflow's team did not write, for checking mediaflow's sender.

Every POST is checked in this order, the first failure deciding the answer:
    bad or missing webhook-* headers or signature   401  (the library's verify())
    webhook-timestamp more than --tolerance seconds
    in the past or in the future                    400  "timestamp too old" / "timestamp too new"
    webhook-id already answered 2xx                 409  "replayed"
then by path:
    /ok        204
    /fail-N    500 to the first N verified deliveries of each webhook-id, then 204
    /fail      503 {"error": "always failing"}
    other      404
Other methods get http.server's 501 and are not logged.
Error answers carry {"error": reason}. The library's own timestamp check, fixed at 5 minutes, is
replaced by the one above so that the tolerance can be set.

Each request appends one JSON line to the log, flushed at once:
    {"path", "webhook_id", "webhook_timestamp", "status", "verified", "reason" (null on 2xx),
     "body" (utf-8, undecodable bytes replaced),
     "headers": {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}}
Absent headers are null.

usage: webhook_receiver.py --secret whsec_... --log FILE [--tolerance 300] [--port 0]
Binds 127.0.0.1:PORT (port 0: a free port), prints the port on a line of its own, serves until
killed.
"""

import argparse
import json
import re
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature", "content-type")


class Verifier(Webhook):
    """The library's Webhook with its timestamp check (a private method) reduced to parsing."""

    def _Webhook__verify_timestamp(self, header):
        try:
            return datetime.fromtimestamp(float(header), tz=timezone.utc)
        except (ValueError, OverflowError, OSError) as e:
            raise WebhookVerificationError("Invalid Signature Headers") from e


class Receiver(BaseHTTPRequestHandler):
    lock = threading.Lock()
    answered = set()  # webhook-ids answered 2xx
    failed = {}  # webhook-id -> 500s given by /fail-N

    def decide(self, body, headers):
        """(status, reason, verified) for a request; updates the replay and failure state."""
        try:
            verifier.verify(body, headers, json_parse=False)
        except (WebhookVerificationError, ValueError) as e:
            # ValueError: the library's parsing fails on a malformed signature or non-utf-8 body.
            return 401, f"{type(e).__name__}: {e}", False
        age = time.time() - float(headers["webhook-timestamp"])
        if age > args.tolerance:
            return 400, "timestamp too old", True
        if -age > args.tolerance:
            return 400, "timestamp too new", True
        msg_id = headers["webhook-id"]
        with self.lock:
            if msg_id in self.answered:
                return 409, "replayed", True
            path = urllib.parse.urlsplit(self.path).path
            fail = re.fullmatch(r"/fail-(\d+)", path)
            if fail and self.failed.get(msg_id, 0) < int(fail[1]):
                self.failed[msg_id] = self.failed.get(msg_id, 0) + 1
                return 500, f"failing {self.failed[msg_id]} of {fail[1]}", True
            if path == "/fail":
                return 503, "always failing", True
            if not fail and path != "/ok":
                return 404, "no such path", True
            self.answered.add(msg_id)
            return 204, None, True

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {h: self.headers[h] for h in HEADERS if h in self.headers}
        status, reason, verified = self.decide(body, headers)
        entry = {
            "path": self.path,
            "webhook_id": headers.get("webhook-id"),
            "webhook_timestamp": headers.get("webhook-timestamp"),
            "status": status,
            "verified": verified,
            "reason": reason,
            "body": body.decode("utf-8", errors="replace"),
            "headers": {h: headers.get(h) for h in HEADERS},
        }
        with self.lock:
            log.write(json.dumps(entry) + "\n")
            log.flush()
        self.send_response(status)
        if reason is None:
            self.end_headers()
            return
        raw = json.dumps({"error": reason}).encode()
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


parser = argparse.ArgumentParser()
parser.add_argument("--secret", required=True, help="whsec_<base64 key>")
parser.add_argument("--log", required=True)
parser.add_argument("--tolerance", type=float, default=300)
parser.add_argument("--port", type=int, default=0)
args = parser.parse_args()
verifier = Verifier(args.secret)
log = open(args.log, "a", encoding="utf-8")

server = ThreadingHTTPServer(("127.0.0.1", args.port), Receiver)
print(server.server_address[1], flush=True)
server.serve_forever()
