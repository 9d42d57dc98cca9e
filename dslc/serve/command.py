"""`dslc serve SPEC --weights DIR`: load once, then serve the OpenAI-compatible API with uvicorn."""

from __future__ import annotations

from dslc.generate import GenerateError


def check_serve_args(args) -> None:
    if args.slots < 1 or args.slots > 1024:
        raise GenerateError(f"--slots must be in 1 .. 1024, got {args.slots}")
    if args.max_queue < 0:
        raise GenerateError(f"--max-queue must be 0 or more, got {args.max_queue}")
    if not 0 <= args.port < 65536:
        raise GenerateError(f"--port must be in 0 .. 65535, got {args.port}")
    if args.max_len < 2:
        raise GenerateError(f"--max-len must be at least 2, got {args.max_len}")
    if args.max_body < 1024:
        raise GenerateError(f"--max-body must be at least 1024 bytes, got {args.max_body}")


def build_server(args, log=None):
    """(runtime, ASGI app) for the parsed `dslc serve` arguments."""
    from dslc.runtime import runtime_from_args
    from dslc.serve.app import Limits, create_app
    from dslc.serve.scheduler import Scheduler

    check_serve_args(args)
    runtime = runtime_from_args(args, log=log)
    runtime.cap = args.max_len
    scheduler = Scheduler(runtime.model, args.slots, runtime.max_len, runtime.eos, max_queue=args.max_queue)
    return runtime, create_app(runtime, scheduler, Limits(max_body=args.max_body))


def serve_command(args) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True, soft_wrap=True)
    try:
        import uvicorn

        from dslc.chat_template import ChatTemplateError
    except ImportError as e:
        console.print(f"[red]error[/red]: `dslc serve` needs the serve extra ({e}): pip install 'dslc[serve]'")
        return 2
    try:
        runtime, app = build_server(args, log=lambda m: console.print(f"[dim]{escape(m)}[/dim]"))
    except (GenerateError, ChatTemplateError) as e:
        console.print(f"[red]error[/red]: {escape(str(e))}")
        return 2
    console.print(
        f"serving {escape(runtime.name)} ({args.slots} slots, context {runtime.max_len}) on "
        f"http://{args.host}:{args.port}  (chat page at /, API at /v1)"
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    return 0
