"""The connector's server for the benchmarks: `connector serve`'s app and uvicorn settings,
plus a no-op route on the same stack to measure against. Not for production."""

from __future__ import annotations

import argparse
import os

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from connector.config import load_config
from connector.logs import configure_logging
from connector.receiver import add_fast_path, create_app
from connector.server import ConnectorServer, uvicorn_config
from connector.service import Service


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    config = load_config(args.config)
    configure_logging(level=config.server.log_level)
    service = Service(config, role="receiver" if config.server.pipeline_process else "all")
    app = create_app(service)

    @app.post("/noop/{dispensary}", status_code=202)
    async def noop(dispensary: str, request: Request) -> Response:
        # counted as an incoming webhook like the real route, so that background work (in
        # this process or the pipeline's) yields the same way during both routes' rounds:
        # the comparison stays fair
        service.webhook_started()
        try:
            return JSONResponse({"status": "accepted"}, status_code=202)
        finally:
            service.webhook_finished()

    # the same fast path as the webhook route (in front of the middleware stack), so both
    # routes pay the same server stack
    add_fast_path(app, noop, prefix="/noop/")
    server = ConnectorServer(uvicorn_config(app, config, host="127.0.0.1", port=args.port))
    profile_to = os.environ.get("BENCH_PROFILE")  # a file: cProfile of the whole run
    if profile_to:
        import cProfile

        cProfile.runctx("server.run()", globals(), {"server": server}, profile_to)
    else:
        server.run()


if __name__ == "__main__":
    main()
