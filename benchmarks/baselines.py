"""The baselines every ratio is taken against, measured in the same run.

``python -m benchmarks.baselines rawfile ROOT PORT`` serves files with
``socket.sendfile`` (one connection per file: a name line in, the bytes out,
then close); :func:`raw_fetch` is its receiver (``recv_into`` a 1 MiB buffer,
then write to a file).  ``python -m benchmarks.baselines jsonlines PORT`` is
the least a Twisted newline-delimited JSON server can do per request (decode
the request, encode a small reply), the ceiling for the tracker.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

BUFFER = 1024 * 1024


def serve_files(root: Path, port: int) -> None:
    """Serve files under *root* one connection at a time, until killed."""
    with socket.create_server(("127.0.0.1", port), backlog=128) as server:
        while True:
            conn, _ = server.accept()
            with conn:
                name = b""
                while not name.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    name += chunk
                if not name.endswith(b"\n"):
                    continue  # a probe that only checked the port
                try:
                    with open(root / name.strip().decode(), "rb") as f:
                        conn.sendfile(f)
                except OSError as e:
                    print(f"could not send {name!r}: {e}", file=sys.stderr)


def raw_fetch(port: int, name: str, dest: Path) -> tuple[int, float]:
    """Fetch *name* from :func:`serve_files` into *dest*; returns (bytes, seconds)."""
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    started = time.perf_counter()
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as conn, open(dest, "wb") as out:
        conn.sendall(name.encode() + b"\n")
        while n := conn.recv_into(buf):
            out.write(view[:n])
            got += n
    return got, time.perf_counter() - started


def serve_jsonlines(port: int) -> None:
    """A Twisted LineReceiver that decodes each request and answers ``{"v":1,"id":N,"ok":true}``."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory
    from twisted.protocols.basic import LineReceiver

    class Echo(LineReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 4096

        def lineReceived(self, line: bytes) -> None:
            request: dict[str, Any] = json.loads(line)
            self.sendLine(json.dumps({"v": 1, "id": request["id"], "ok": True}, separators=(",", ":")).encode())

    factory = Factory.forProtocol(Echo)
    factory.noisy = False
    reactor.listenTCP(port, factory, backlog=128, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def main(argv: list[str]) -> None:
    if argv[:1] == ["rawfile"] and len(argv) == 3:
        serve_files(Path(argv[1]), int(argv[2]))
    elif argv[:1] == ["jsonlines"] and len(argv) == 2:
        serve_jsonlines(int(argv[1]))
    else:
        sys.exit("usage: python -m benchmarks.baselines rawfile ROOT PORT | jsonlines PORT")


if __name__ == "__main__":
    main(sys.argv[1:])
