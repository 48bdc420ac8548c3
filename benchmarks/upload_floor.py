"""What this machine allows an upload path in Python before the coordinator does anything:
an aiohttp server that reads each upload's body and makes it durable with the coordinator's
own blob store, one payload at a time (written, fsync'ed on a pool of threads, renamed,
its directory fsync'ed), then answers 200 with a small JSON body. No database, no
authentication, no decoding, no aggregation: ``bench_coordinator`` runs it beside the real
server, under the same load, as the ceiling the coordinator's own work lowers. It runs on
the event loop the service runs plain HTTP on by default (:mod:`coordinator.event_loop`).

Run by ``bench_coordinator`` as ``python benchmarks/upload_floor.py BLOB_DIR``: it listens
on a free port of 127.0.0.1 and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from coordinator.blobs import BlobStore
from coordinator.config import CoordinatorConfig
from coordinator.event_loop import new_loop

MAX_BODY = 1 << 22


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("blob_dir", metavar="BLOB_DIR", type=Path,
                        help="an existing directory the payloads are written under")  # fmt: skip
    blob_dir: Path = parser.parse_args(argv).blob_dir
    if not blob_dir.is_dir():
        # BlobStore would create it: a mistyped word must not leave a tree of directories.
        parser.error(f"{blob_dir} is not a directory")
    blobs = BlobStore(blob_dir)
    # Each upload durable on its own, as many at once as uploads in flight (32): nothing
    # waits for a batch to form.
    syncers = ThreadPoolExecutor(32, thread_name_prefix="floor-fsync")

    def durable(body: bytes) -> None:
        blobs.install([blobs.stage(body)])

    async def upload(request: web.Request) -> web.Response:
        body = await request.read()
        await asyncio.get_running_loop().run_in_executor(syncers, durable, body)
        return web.json_response({"accepted": True})

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_post("/v1/assignments/{assignment_id}/update", upload)
    listener = socket.create_server(("127.0.0.1", 0))  # listening before the port is told
    print(listener.getsockname()[1], flush=True)
    loop = new_loop(CoordinatorConfig().event_loop)
    web.run_app(app, sock=listener, print=None, access_log=None, loop=loop)


if __name__ == "__main__":
    main()
