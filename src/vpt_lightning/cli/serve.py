"""``vpt-serve CKPT... --host 127.0.0.1 --port N``: an HTTP server (LitServe) classifying images with trained tasks
on one shared backbone; requests of different tasks are batched together."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .predict import add_model_arguments, load_model


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="vpt-serve", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32, help="largest batch of requests (default 32)")
    parser.add_argument("--batch-timeout", type=float, default=0.01,
                        help="seconds to wait for a batch to fill (default %(default)s)")
    parser.add_argument("--max-request-bytes", type=int, default=16 * 2**20,
                        help="larger request bodies get 413 (default 16 MiB)")
    parser.add_argument("--accelerator", default="auto", help="LitServe accelerator: auto, cpu, cuda, mps")
    parser.add_argument("--devices", default="1", help="devices (default 1)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.max_batch_size < 1 or args.max_request_bytes < 1:
        parser.error("--top-k, --max-batch-size and --max-request-bytes must be >= 1")
    try:
        from ..serving.server import serve
    except ImportError as err:
        print(f"vpt-serve needs LitServe: pip install 'vpt-lightning[serve]' ({err})", file=sys.stderr)
        return 1
    try:
        model = load_model(args.checkpoints, args.backbone, args.imports)
    except (ValueError, FileNotFoundError) as err:
        print(f"vpt-serve: error: {err}", file=sys.stderr)
        return 1
    print(f"vpt-serve: {len(model.task_names)} task(s) {model.task_names} on http://{args.host}:{args.port}", flush=True)
    serve(
        model, host=args.host, port=args.port, log_level=args.log_level, default_top_k=args.top_k,
        max_batch_size=args.max_batch_size, batch_timeout=args.batch_timeout, max_request_bytes=args.max_request_bytes,
        accelerator=args.accelerator, devices=int(args.devices) if args.devices.isdigit() else args.devices,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
