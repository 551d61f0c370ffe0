"""A started listener freezes what the process holds (connector/server.py): the cyclic
garbage collector no longer walks the startup's objects at each full collection."""

from __future__ import annotations

import asyncio
import gc
import socket

import uvicorn
from fastapi import FastAPI

from connector.server import ConnectorServer


def test_startup_moves_the_heap_out_of_the_collectors_reach() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = ConnectorServer(uvicorn.Config(FastAPI(), lifespan="off", log_config=None))
    gc.unfreeze()
    assert gc.get_freeze_count() == 0

    async def start_and_stop() -> int:
        server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=[sock])
        frozen = gc.get_freeze_count()
        await server.shutdown(sockets=[sock])
        return frozen

    try:
        assert asyncio.run(start_and_stop()) > 0
    finally:
        gc.unfreeze()
        sock.close()
