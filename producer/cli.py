"""``fleet``: the project's command line (worker, flower, tiny model, demo)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from producer import naming
from producer.errors import ConfigError, UnknownModel
from producer.settings import get_settings

cli = typer.Typer(help="vllm-fleet: share resident vLLM engines through Celery and Redis.",
                  no_args_is_help=True, add_completion=False)


def default_engine_id(model: str, host: str) -> str:
    """``<model>-<host>`` (the host's first label), made a plain id: the ``/`` of a Hugging Face
    id (``Qwen/Qwen3-8B``), or any other character a node name cannot carry, becomes ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{model}-{host.split('.')[0]}")


def worker_argv(model: str, engine_id: str, gpus: str, concurrency: int, loglevel: str,
                host: str, task_events: bool = True) -> list[str]:
    """The ``celery worker`` command line of one engine."""
    events = ["-E"] if task_events else []
    return [
        sys.executable, "-m", "celery", "-A", "workers.app", "worker",
        "--model", model, "--engine-id", engine_id, "--gpus", gpus,
        "-n", f"{engine_id}@{host}",
        # The engine's own queue only: the model queue is added once the engine is warm.
        "-Q", naming.engine_queue(engine_id),
        # The engine lives in this process (vLLM must not start inside a forked daemonic child).
        # Serving tasks skip the pool (workers/batcher.py); its threads run lifecycle tasks, and
        # its size sets how many tasks the worker takes (Celery's prefetch).
        "-P", "threads", "-c", str(concurrency),
        *events, "--without-gossip", "-l", loglevel,
    ]


@cli.command()
def worker(
    model: Annotated[str, typer.Option(
        help="Model id or alias to serve (FLEET_MODELS, FLEET_CONFIG).")],
    engine_id: Annotated[str | None, typer.Option(help="Engine id (<model>-<host>).")] = None,
    gpus: Annotated[str, typer.Option(help="GPU ids to pin to, e.g. 0,1 (empty: CPU).")] = "",
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight.")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    host: Annotated[str | None, typer.Option(help="Host part of the node name.")] = None,
) -> None:
    """Start a Celery worker holding one resident engine for MODEL."""
    settings = get_settings()
    try:
        # An unknown model fails here, with the list of known ones; an alias serves its model.
        model = settings.resolve_model(model)
    except UnknownModel as e:
        raise typer.BadParameter(str(e), param_hint="--model") from None
    host = host or socket.gethostname()
    engine_id = engine_id or default_engine_id(model, host)
    naming.check_id(engine_id, what="--engine-id")
    if gpus:
        # Set before celery (and so torch) is imported in the new process image; indexes as
        # nvidia-smi numbers them (CUDA's default order puts the fastest GPU first).
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    argv = worker_argv(model, engine_id, gpus, concurrency or settings.worker_concurrency,
                       loglevel, host, settings.task_events)
    os.execv(sys.executable, argv)


def flower_argv(port: int | None, insecure: bool) -> tuple[list[str], dict[str, str]]:
    """The command line of the fleet's Flower (``producer/flower.py``: ``celery -A producer
    flower`` with the fleet's pages) and its environment, with basic auth from the settings.

    The credentials go in Flower's ``FLOWER_BASIC_AUTH`` variable, not on the command line,
    where every user of the host could read them in the process list.
    """
    s = get_settings()
    argv = [sys.executable, "-m", "producer.flower",
            f"--address={s.flower_address}", f"--port={port or s.flower_port}"]
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    if s.flower_user and s.flower_password:
        password = s.flower_password.get_secret_value()
        if "," in s.flower_user + password:  # Flower splits the variable's value on commas
            raise typer.BadParameter("FLEET_FLOWER_USER and FLEET_FLOWER_PASSWORD cannot "
                                     "hold a comma", param_hint="credentials")
        env["FLOWER_BASIC_AUTH"] = f"{s.flower_user}:{password}"
    elif not insecure:
        raise typer.BadParameter(
            "set FLEET_FLOWER_USER and FLEET_FLOWER_PASSWORD, or pass --insecure",
            param_hint="credentials",
        )
    return argv, env


@cli.command()
def flower(
    port: Annotated[int | None, typer.Option(help="Port (default FLEET_FLOWER_PORT).")] = None,
    insecure: Annotated[bool, typer.Option(help="Start without basic auth.")] = False,
) -> None:
    """Start Flower for the fleet on 127.0.0.1 behind basic auth."""
    argv, env = flower_argv(port, insecure)
    os.execve(sys.executable, argv, env)


@cli.command()
def gateway(
    host: Annotated[str | None, typer.Option(help="Address (default FLEET_GATEWAY_ADDRESS).")
                    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (default FLEET_GATEWAY_PORT).")] = None,
    insecure: Annotated[bool, typer.Option(help="Start without API keys.")] = False,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Serve the OpenAI-compatible API (/v1/models, /v1/chat/completions, /v1/completions)
    in front of the fleet, behind the bearer keys of FLEET_GATEWAY_API_KEYS."""
    import logging

    import uvicorn

    from producer.gateway.app import create_app

    settings = get_settings()
    if not settings.gateway_api_keys and not insecure:
        raise typer.BadParameter(
            'set FLEET_GATEWAY_API_KEYS (JSON: {"name": "key"}), or pass --insecure',
            param_hint="credentials",
        )
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(message)s")
    uvicorn.run(create_app(settings, insecure=insecure), host=host or settings.gateway_address,
                port=port or settings.gateway_port, log_level=loglevel, access_log=False)


ENGINE_COLUMNS = ("engine_id", "node", "model", "gpus", "state", "in_flight", "running",
                  "waiting", "waiting_by_priority", "requests_served", "tokens_generated",
                  "tasks_failed", "uptime_s", "queue_depth", "queued_by_priority", "metrics_url")


def engine_cell(engine: dict[str, Any], column: str) -> str:
    """One cell of ``fleet engines``: priorities as ``priority:count`` pairs."""
    if column == "waiting_by_priority":
        waiting = {p: c["waiting"] for p, c in (engine.get("priorities") or {}).items()}
        return " ".join(f"{p}:{n}" for p, n in waiting.items() if n)
    if column == "queued_by_priority":
        return " ".join(f"{p}:{n}" for p, n in (engine.get(column) or {}).items())
    return str(engine.get(column, ""))


@cli.command()
def engines(
    model: Annotated[str | None, typer.Option(help="Only engines of this model.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for replies.")] = 1.0,
) -> None:
    """List the live engines (from each worker's `inspect engine` answer)."""
    import json

    from rich.console import Console
    from rich.table import Table

    from producer.engines import list_engines

    found = list_engines(model, timeout=timeout)
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    table = Table(*ENGINE_COLUMNS)
    for engine in found:
        table.add_row(*(engine_cell(engine, column) for column in ENGINE_COLUMNS))
    Console().print(table)


@cli.command()
def top(
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between two refreshes.")
                        ] = 1.0,
    window: Annotated[float, typer.Option(min=0.1, help="Seconds the rates are taken over.")
                      ] = 5.0,
    model: Annotated[str | None, typer.Option(help="Only this model's engines and queue.")
                     ] = None,
    timeout: Annotated[float, typer.Option(min=0.05, help="Seconds to wait for replies.")
                       ] = 0.5,
    once: Annotated[bool, typer.Option(
        "--once", help="Print one snapshot and exit (as when stdout is not a terminal).")] = False,
) -> None:
    """A live view of every engine and model queue of the fleet; q quits."""
    from kombu.exceptions import OperationalError
    from rich.console import Console

    from producer.top import Poller
    from producer.topview import print_once, watch

    settings = get_settings()
    if model is not None:
        # A model configured on the workers only is taken as named: its engines still show.
        with contextlib.suppress(UnknownModel):
            model = settings.resolve_model(model)
        try:
            naming.check_model_id(model, what="model")
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--model") from None
    poller = Poller(settings.all_models(), model=model, window=window, timeout=timeout)
    console = Console()
    try:
        if once or not console.is_terminal:
            print_once(poller, interval=interval, console=console)
        else:
            watch(poller, interval=interval, console=console)
    except KeyboardInterrupt:
        pass  # Ctrl-C quits as q does; watch has restored the terminal on the way out
    except OperationalError as e:  # the broker is down or refuses us: nothing to show
        typer.echo(f"fleet top: cannot reach the broker: {e}", err=True)
        raise typer.Exit(1) from None


@cli.command()
def health(
    engine_id: Annotated[str, typer.Argument(help="Engine id (fleet worker --engine-id).")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for its answer.")] = 5.0,
) -> None:
    """Exit 0 if the engine is ready (or idle-unloaded, ready to reload), 1 otherwise: a health
    check for a supervisor (docker compose, Kubernetes)."""
    from producer.engines import health as engine_health

    answer = engine_health(engine_id, timeout=timeout)
    if answer is None:
        typer.echo(f"{engine_id}: no answer within {timeout:.0f}s")
        raise typer.Exit(1)
    state = answer["state"]
    if answer["ready"]:
        typer.echo(f"{engine_id}: ready")
    elif state == "idle-unloaded":
        typer.echo(f"{engine_id}: idle-unloaded (the next request reloads it)")
    else:
        typer.echo(f"{engine_id}: {state}, not ready")
        raise typer.Exit(1)


EngineIds = Annotated[list[str] | None, typer.Argument(help="Engine ids.")]
ModelOpt = Annotated[str | None, typer.Option(help="Every engine of this model.")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every engine of the fleet.")]
WaitOpt = Annotated[float, typer.Option(help="Seconds to wait for them to exit (0: no).")]


@cli.command()
def shutdown(engine_ids: EngineIds = None, model: ModelOpt = None, all_engines: AllOpt = False,
             wait: WaitOpt = 300) -> None:
    """Warm-shut engines down: each finishes the requests it holds, then its worker exits."""
    from producer.engines import shutdown as shutdown_nodes

    _stop_engines("shutting down", shutdown_nodes, engine_ids, model, all_engines, wait)


@cli.command()
def drain(engine_ids: EngineIds = None, model: ModelOpt = None, all_engines: AllOpt = False,
          wait: WaitOpt = 300) -> None:
    """Stop engines taking tasks, finish every task they already took, then exit."""
    from producer.engines import drain as drain_nodes

    _stop_engines("draining", drain_nodes, engine_ids, model, all_engines, wait)


def _stop_engines(verb: str, stop: Any, engine_ids: list[str] | None, model: str | None,
                  all_engines: bool, wait: float) -> None:
    from producer.engines import select_nodes

    if not (engine_ids or model or all_engines):
        raise typer.BadParameter("name engine ids, --model or --all", param_hint="engines")
    nodes = select_nodes(list(engine_ids or []), model=model, every=all_engines)
    if not nodes:
        typer.echo("no live engine matches")
        raise typer.Exit(1)
    typer.echo(f"{verb} {', '.join(nodes)}")
    left = stop(nodes, wait=wait or None)
    if wait and left:
        typer.echo(f"still running after {wait:.0f}s: {', '.join(left)}")
        raise typer.Exit(1)


@cli.command("build-tiny-model")
def build_tiny_model(
    out: Annotated[Path | None, typer.Option(help="Target directory.")] = None,
) -> None:
    """Build the embedded tiny random-weight model (default: the cache folder)."""
    from workers.tiny_model import ensure_tiny_model

    path = ensure_tiny_model(out or get_settings().tiny_model_dir())
    typer.echo(str(path))


@cli.command()
def demo() -> None:
    """Start a private Redis, a worker and Flower, enqueue tasks from an app, stop everything."""
    from producer.demo import run_demo

    raise typer.Exit(run_demo())


batch = typer.Typer(help="Batch jobs: OpenAI batch files through the fleet.",
                    no_args_is_help=True)
cli.add_typer(batch, name="batch")


@batch.command("run")
def batch_run(
    input_file: Annotated[Path, typer.Argument(
        metavar="INPUT.jsonl", exists=True, dir_okay=False, help="OpenAI batch input file.")],
    output: Annotated[Path, typer.Option(
        "-o", "--output", dir_okay=False, help="Where result lines go (appended).")],
    errors: Annotated[Path | None, typer.Option(
        dir_okay=False, help="Error lines here instead of in the output.")] = None,
    ordered: Annotated[bool, typer.Option(
        "--ordered", help="Write results in input order (as vllm run-batch).")] = False,
    retry_failed: Annotated[bool, typer.Option(
        "--retry-failed", help="Send again the requests whose line is an error.")] = False,
    priority: Annotated[str, typer.Option(
        help="Priority of every request: 0-9, interactive, default or batch.")] = "batch",
    chunk_size: Annotated[int, typer.Option(help="Requests per message.")] = 256,
    window: Annotated[int, typer.Option(help="Messages in flight at once.")] = 32,
) -> None:
    """Run INPUT.jsonl through the fleet, each result written to OUTPUT as it arrives; run it
    again to resume (lines already in OUTPUT are skipped); Ctrl-C cancels what is in flight."""
    from producer.batchview import ProgressView, summary_text
    from producer.errors import InvalidRequest
    from producer.gateway.batchfile import resume_command, run_batch

    level: int | str = int(priority) if priority.isdigit() else priority
    try:
        with ProgressView() as view:
            summary = run_batch(input_file, output, errors_path=errors, ordered=ordered,
                                retry_failed=retry_failed, priority=level,
                                chunk_size=chunk_size, window=window, on_progress=view)
    except InvalidRequest as e:
        typer.echo(f"fleet batch run: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(summary_text(summary), err=True)
    if summary.cancelled:
        typer.echo(f"resume with: {resume_command()}", err=True)
        raise typer.Exit(130)


def main() -> None:
    try:
        cli()
    except ConfigError as e:
        # The operator's to fix, and the message says where: a traceback would only bury it.
        typer.echo(f"fleet: {e}", err=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
