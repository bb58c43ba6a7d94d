"""An SMTP sink built on aiosmtpd, an SMTP server mediaflow's team did not write, for checking
mediaflow's mail sender against a real server.

Each accepted message is stored Maildir-style: its bytes as received after DATA (dot-unstuffed,
CRLF line endings, nothing prepended; the envelope is not recorded) are written to DIR/tmp and
renamed to DIR/new/<unique>.eml, so a file in DIR/new is always complete. Names start with a
nanosecond timestamp, so sorting them gives the order of arrival. A client that disconnects
before the final "." leaves nothing. SMTPUTF8 and 8BITMIME are advertised.

With --reject-first N the first N DATA transactions are answered "451 4.3.0 try again later" and
not stored (a flaky server, for retry tests).

With --tls starttls (and --cert/--key) the server requires STARTTLS before anything else; with
--tls implicit it speaks TLS from the first byte. With --auth USER:PASSWORD it requires AUTH
(PLAIN or LOGIN) with exactly those credentials. For each stored message DIR/sessions/<name>.json
tells how it came: {"tls": the TLS version or null, "user": the authenticated user or null}.

usage: smtp_sink.py --dir DIR [--host 127.0.0.1] [--port 0] [--reject-first N]
                    [--tls starttls|implicit --cert PEM --key PEM] [--auth USER:PASSWORD]
Binds HOST:PORT (port 0: a free port), prints the port on a line of its own, serves until killed.
"""

import argparse
import asyncio
import json
import os
import ssl
import time

from aiosmtpd.smtp import SMTP, AuthResult


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
        tls = server.transport.get_extra_info("ssl_object")
        session_info = {
            "tls": tls.version() if tls else None,
            "user": session.auth_data if session.authenticated else None,
        }
        with open(os.path.join(self.folder, "sessions", name + ".json"), "w") as f:
            json.dump(session_info, f)
        os.rename(tmp, os.path.join(self.folder, "new", name))
        return "250 Message accepted for delivery"


def authenticator(user, password):
    def check(server, session, envelope, mechanism, auth_data):
        login = auth_data.login.decode()
        ok = login == user and auth_data.password.decode() == password
        # handled=False: aiosmtpd answers a failure with its own 535.
        return AuthResult(success=ok, handled=False, auth_data=login if ok else None)

    return check


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--reject-first", type=int, default=0)
    parser.add_argument("--tls", choices=["starttls", "implicit"])
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--auth", help="USER:PASSWORD")
    args = parser.parse_args()
    for sub in ("tmp", "new", "sessions"):
        os.makedirs(os.path.join(args.dir, sub), exist_ok=True)
    sink = Sink(args.dir, args.reject_first)
    context = None
    if args.tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.cert, args.key)
    options = {"enable_SMTPUTF8": True, "decode_data": False}
    if args.tls == "starttls":
        options.update(tls_context=context, require_starttls=True)
    if args.auth:
        user, password = args.auth.split(":", 1)
        # Over implicit TLS the whole session is encrypted: AUTH needs no STARTTLS.
        options.update(
            authenticator=authenticator(user, password),
            auth_required=True,
            auth_require_tls=args.tls == "starttls",
        )
    server = await asyncio.get_running_loop().create_server(
        lambda: SMTP(sink, **options),
        args.host,
        args.port,
        ssl=context if args.tls == "implicit" else None,
    )
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()


asyncio.run(main())
