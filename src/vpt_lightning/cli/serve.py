"""``vpt-serve TASK... [--tasks DIR...] --host 127.0.0.1 --port N``: an HTTP server (LitServe) classifying images
with trained tasks on one shared backbone (the tasks given, held in memory, and those of task folders, loaded on
first use and changed without a restart); requests of different tasks are batched together. SIGTERM or Ctrl+C
stops it gracefully: the requests in flight are answered, then every process it started ends. If one of them dies
(an OOM kill), the others are stopped and it exits with status 1, for a supervisor to restart it."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..runs.threads import configure_threads
from ..serving.images import MAX_IMAGE_PIXELS
from .console import report_errors
from .task_arguments import add_model_arguments, cache_size, check_model_arguments, lightning_devices, load_task_store

API_KEY_ENV, API_KEY_HEADER = "LIT_SERVER_API_KEY", "X-API-Key"  # as in serving.server (importable without LitServe)


@report_errors("vpt-serve")
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve until SIGTERM / Ctrl+C, then end the process with status 0, or with status 1 (and one line saying
    which) when a process of the server died; returns 1 (without serving) on bad arguments or checkpoints."""
    configure_threads()
    parser = argparse.ArgumentParser(prog="vpt-serve", description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=32, help="largest batch of requests (default 32)")
    parser.add_argument(
        "--batch-timeout", type=float, default=0.01, help="seconds to wait for a batch to fill (default %(default)s)"
    )
    parser.add_argument(
        "--max-request-bytes", type=int, default=16 * 2**20, help="larger request bodies get 413 (default 16 MiB)"
    )
    parser.add_argument(
        "--max-buffered-bytes",
        type=int,
        default=None,
        help="request bodies held at once, summed over the requests being received or answered: a body that would "
        "go over it gets 503 with Retry-After, unread (default 4 x --max-request-bytes, or one upload of "
        "--max-package-bytes where the admin routes are open, whichever is more)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help="larger images (width x height, read from the header before decoding) get 413 "
        "(default %(default)s = 4096 x 4096)",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=30,
        help="seconds a client has to send its request headers, and then its body, else 408; an idle connection "
        "is closed after as long (default %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"require the header '{API_KEY_HEADER}: KEY' on every route but /health "
        f"(default: the environment variable {API_KEY_ENV}, else no key)",
    )
    parser.add_argument("--docs", action="store_true", help="serve the API docs (/docs, /redoc, /openapi.json)")
    parser.add_argument(
        "--ui",
        action="store_true",
        help="a demo page at /ui (Gradio, pip install 'vpt-lightning[demo]'): upload an image, see the top-5 classes",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=5,
        help="seconds given to the requests in flight on SIGTERM / Ctrl+C (default %(default)s)",
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=0.5,
        help="how often the task folders (--tasks) are looked at for added, replaced or removed tasks "
        "(default %(default)s; a change is served within two polls)",
    )
    parser.add_argument(
        "--max-package-bytes",
        type=cache_size,
        default=64 * 2**20,
        metavar="SIZE",
        help="larger task uploads (PUT /tasks/NAME) get 413; they count in --max-buffered-bytes (default 64MiB)",
    )
    parser.add_argument("--accelerator", default="auto", help="LitServe accelerator: auto, cpu, cuda, mps")
    parser.add_argument("--devices", default=1, type=lightning_devices, help="devices (default 1)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    check_model_arguments(parser, args)
    if args.poll_seconds <= 0:
        parser.error("--poll-seconds must be > 0")
    for name in ("top_k", "max_batch_size", "max_request_bytes", "max_buffered_bytes", "max_image_pixels"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.read_timeout <= 0 or args.shutdown_timeout <= 0:
        parser.error("--read-timeout and --shutdown-timeout must be > 0 seconds")
    try:
        from ..serving.server import ChildDied, buffered_bytes_cap, exposure_warning, resolve_api_key, serve
    except ImportError as err:
        print(f"vpt-serve needs LitServe: pip install 'vpt-lightning[serve]' ({err})", file=sys.stderr)
        return 1
    if args.ui:
        try:
            import gradio  # noqa: F401
        except ImportError as err:
            print(f"vpt-serve --ui needs Gradio: pip install 'vpt-lightning[demo]' ({err})", file=sys.stderr)
            return 1
    try:
        api_key = resolve_api_key(args.api_key)
        uploads = args.max_package_bytes if api_key and args.tasks else 0  # the admin routes' bodies
        max_buffered_bytes = buffered_bytes_cap(args.max_request_bytes, args.max_buffered_bytes, uploads)
    except ValueError as err:
        print(f"vpt-serve: error: {err}", file=sys.stderr)
        return 1
    warning = exposure_warning(args.host, api_key)
    if warning:
        print(f"vpt-serve: warning: {warning}", file=sys.stderr, flush=True)
    try:
        model = load_task_store(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"vpt-serve: error: {err}", file=sys.stderr)
        return 1
    model.poll_seconds = args.poll_seconds
    for name, problem in list(model.problems.items())[:5]:
        print(f"vpt-serve: warning: task {name} not served: {problem}", file=sys.stderr)
    if len(model.problems) > 5:
        print(f"vpt-serve: warning: {len(model.problems) - 5} more not served (GET /tasks lists them)", file=sys.stderr)
    names = model.task_names
    indexed = f", folders indexed in {model.timings['index_s']:.1f} s" if args.tasks else ""
    print(
        f"vpt-serve: {len(names)} task(s) {names if len(names) <= 20 else names[:20] + ['...']} on "
        f"http://{args.host}:{args.port}"
        + (f" (demo page: http://{args.host}:{args.port}/ui)" if args.ui else "")
        + f" (backbone built in {model.timings['backbone_s']:.1f} s{indexed})",
        flush=True,
    )
    status = 0
    try:
        serve(
            model,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            default_top_k=args.top_k,
            max_batch_size=args.max_batch_size,
            batch_timeout=args.batch_timeout,
            max_request_bytes=args.max_request_bytes,
            max_buffered_bytes=max_buffered_bytes,
            max_image_pixels=args.max_image_pixels,
            read_timeout=args.read_timeout,
            api_key=api_key,
            docs=args.docs,
            ui=args.ui,
            shutdown_timeout=args.shutdown_timeout,
            max_package_bytes=args.max_package_bytes,
            accelerator=args.accelerator,
            warn_exposure=False,
            devices=args.devices,
        )
    except ChildDied as err:  # a process of the server died (OOM kill...): the others stopped, a supervisor restarts
        print(f"vpt-serve: error: {err}", file=sys.stderr)
        status = 1
    # every process of the server has ended and nothing is left to write: end now. The interpreter's own teardown
    # after LitServe (native code, no Python frame) took ~9 s on a loaded 2-core machine, past a 10 s stop budget.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
