"""`specdecode serve`: the command line of the server (see `specdecode.serve`)."""

from __future__ import annotations

import argparse
import signal
import socket
import sys
import threading
import time

from specdecode.errors import SpecDecodeError
from specdecode.serve.scheduler import DEFAULT_MAX_BATCH


def add_parser(sub) -> None:
    from specdecode import cli

    p = sub.add_parser(
        "serve",
        help="serve a model over OpenAI's API, speculatively",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, "
        "/v1/chat/completions, streaming or not; /v1/models, /health, /metrics in Prometheus "
        "format) with the same model and speculation options as generate. Output is the "
        "model's own: identical tokens to generate's under greedy decoding, the same "
        "distribution when sampling. Requests share the model's forwards (continuous batching, up "
        "to --max-batch at once), each drafting as far as pays for the whole batch.",
    )
    cli._add_model_args(p)
    cli._add_speculation_args(p)
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=cli.positive_int, default=8000, help="default: 8000")
    p.add_argument(
        "--served-model-name",
        help="the model's name in the API (default: --model as given)",
    )
    p.add_argument(
        "--api-key",
        help="require Authorization: Bearer KEY on every route but /health",
    )
    p.add_argument(
        "--max-waiting",
        type=cli.positive_int,
        default=64,
        metavar="N",
        help="requests that may wait; more are refused with 429 at once (default: 64)",
    )
    p.add_argument(
        "--max-batch",
        type=cli.positive_int,
        default=DEFAULT_MAX_BATCH,
        metavar="N",
        help="requests decoded at once, their drafts verified in one forward (torch and llamacpp "
        "backends; hf runs one at a time); llama.cpp's KV cache is sized for N full contexts "
        f"(default: {DEFAULT_MAX_BATCH})",
    )
    p.add_argument(
        "--shutdown-grace",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="on SIGTERM, how long running streams may take to finish before they are cut "
        "(default: 60)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from specdecode.serve.app import make_app
    except ImportError as exc:
        raise SpecDecodeError(
            f"the server needs {exc.name}: pip install 'specdecode[serve]'"
        ) from None
    from specdecode import cli

    if args.shutdown_grace < 0:
        raise SpecDecodeError("--shutdown-grace must be at least 0 seconds")
    _check_port(args.host, args.port)  # before minutes of model loading
    spec = cli._spec_from_args(args)
    cli.backend_from_args(args)
    llm = cli._load_from_args(args, spec, sequences=args.max_batch)
    cli._warn_if_lossy(args.verifier, args.kernels)
    name = args.served_model_name or args.model
    app = make_app(
        llm,
        spec,
        name,
        api_key=args.api_key,
        max_waiting=args.max_waiting,
        shutdown_grace=args.shutdown_grace,
        max_batch=args.max_batch,
        scheduler_thread=False,
    )
    scheduler = app.state.scheduler
    scheduler.prepare()  # before the port opens: no request waits for it
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    server = uvicorn.Server(config)

    def serve_http() -> None:
        try:
            server.run()
        finally:
            scheduler.stop()  # however the HTTP server ends, the model's loop ends with it

    # The model's loop runs on this thread, which loaded the model (see Scheduler.run); the HTTP
    # server on another, where uvicorn installs no signal handlers: SIGTERM and Ctrl-C go to its
    # graceful shutdown from here (sse-starlette hooks the same call to let streams finish).
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: server.handle_exit(signum, frame))
    http = threading.Thread(target=serve_http, name="specdecode-http", daemon=True)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise SpecDecodeError(f"the server could not start on {args.host}:{args.port}")
    print(f"serving {name} at http://{args.host}:{args.port}/v1 ({spec.drafter})", file=sys.stderr)
    scheduler.run()
    http.join()
    print("server stopped", file=sys.stderr)
    return 0


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise SpecDecodeError(
                f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port"
            ) from None
