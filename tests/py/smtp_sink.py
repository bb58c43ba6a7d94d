"""An SMTP sink built on aiosmtpd, an SMTP server mediaflow's team did not write, for checking
mediaflow's mail sender against a real server.

Each accepted message is stored Maildir-style: its bytes as received after DATA (dot-unstuffed,
CRLF line endings, nothing prepended; the envelope is not recorded) are written to DIR/tmp and
renamed to DIR/new/<unique>.eml, so a file in DIR/new is always complete. Names start with a
nanosecond timestamp, so sorting them gives the order of arrival. A client that disconnects
before the final "." leaves nothing. SMTPUTF8 and 8BITMIME are advertised.

With --reject-first N the first N DATA transactions are answered "451 4.3.0 try again later" and
not stored (a flaky server, for retry tests).

usage: smtp_sink.py --dir DIR [--host 127.0.0.1] [--port 0] [--reject-first N]
Binds HOST:PORT (port 0: a free port), prints the port on a line of its own, serves until killed.
"""

import argparse
import asyncio
import os
import time

from aiosmtpd.smtp import SMTP


class Sink:
    def __init__(self, folder, reject_first):
        self.folder = folder
        self.to_reject = reject_first
        self.stored = 0

    async def handle_DATA(self, server, session, envelope):
        if self.to_reject > 0:
            self.to_reject -= 1
            return "451 4.3.0 try again later"
        self.stored += 1
        name = f"{time.time_ns()}.{os.getpid()}.{self.stored}.eml"
        tmp = os.path.join(self.folder, "tmp", name)
        with open(tmp, "xb") as f:
            f.write(envelope.original_content)
        os.rename(tmp, os.path.join(self.folder, "new", name))
        return "250 Message accepted for delivery"


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reject-first", type=int, default=0)
    args = parser.parse_args()
    for sub in ("tmp", "new"):
        os.makedirs(os.path.join(args.dir, sub), exist_ok=True)
    sink = Sink(args.dir, args.reject_first)
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(sink, enable_SMTPUTF8=True, decode_data=False), args.host, args.port
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


asyncio.run(main())
