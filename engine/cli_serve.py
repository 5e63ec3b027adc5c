"""`unclip serve`: the HTTP server (OpenAI-style `POST /v1/images/generations`, `GET /health`, `GET /metrics`).

    unclip serve [--model DIR | --preset NAME] [--host 127.0.0.1] [--port 8000] [--max-batch 8] ...

The toy model by default, like every command. Needs the `serve` extra (`pip install "unclip-engine[serve]"`:
starlette, uvicorn, prometheus_client). Ctrl-C stops accepting requests and finishes the accepted ones.
"""
from __future__ import annotations

COMMANDS = ("serve",)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve images over HTTP (batching stages across requests)",
                              description=__doc__.split("\n\n")[0])
    from .cli_common import add_model_args
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback only by default)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 1..65535")
    p.add_argument("--max-batch", type=int, default=8, help="most images one stage batch runs")
    p.add_argument("--max-queue", type=int, default=64, help="most requests waiting; beyond it: 429")
    p.add_argument("--timeout", type=float, default=None, help="per-request time limit in seconds (504 after)")
    p.add_argument("--batch-window", type=float, default=0.02,
                   help="seconds a first-stage batch that is not full waits for more requests")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")


def run(args) -> int:
    from .cli_common import check_backend, check_device, choose_backend
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535; got {args.port}")
    device = check_device(args.device)
    args.backend = choose_backend(args)
    check_backend(args.backend, device)
    try:
        import prometheus_client  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ValueError(f"unclip serve needs the serve extra ({e.name} is missing): "
                         "pip install \"unclip-engine[serve]\"") from None
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1; got {args.threads}")
        import torch
        torch.set_num_threads(args.threads)
    from .serve import Engine
    from .serve.http import serve
    options = dict(device=args.device, dtype=args.dtype, backend=args.backend, max_batch=args.max_batch,
                   max_queue=args.max_queue, timeout=args.timeout, batch_window=args.batch_window)
    engine = Engine.from_pretrained(args.model, **options) if args.model else Engine.from_preset(args.preset, **options)
    print(f"unclip serve: {engine.name}, {engine.image_size}x{engine.image_size} images, "
          f"http://{args.host}:{args.port}/v1/images/generations", flush=True)
    serve(engine, host=args.host, port=args.port, log_level=args.log_level)
    return 0
