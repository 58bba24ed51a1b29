"""`localchat bench`: speed and memory figures (bench.py), or the shipped workloads with drafts
off and on (`--task`, bench_tasks.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Any

import typer

from localchat import render, settings
from localchat.commands.models import engine_options
from localchat.commands.options import (
    DEFAULT_MODEL,
    DefaultModelArgument,
    JsonOption,
    OfflineOption,
    env_of,
    given_settings,
    takes_settings,
)
from localchat.errors import ExitStatus, UsageError
from localchat.render import Environment

TASK_GROUPS = ("grounded", "open", "all")  # bench_tasks.TASK_GROUPS, without importing it


def _bench_tasks(env: Environment, options: Any, group: str, repetitions: int,
                 json_output: bool) -> int:
    """`bench --task GROUP`: the shipped workloads, drafts off and on; the exit status."""
    from localchat import bench_tasks
    from localchat.engine.loader import load_engine

    engine = load_engine(options)
    try:
        results = bench_tasks.run_tasks(engine, group, repetitions,
                                        lambda what: render.print_note(env, what)
                                        if render.stderr_is_terminal(env) else None)
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
    finally:
        engine.close()
    record = bench_tasks.task_record(results)
    if json_output:
        render.print_json(env, {"model": str(options.model_path), "tasks": record,
                                "threads": engine.info.threads,
                                "cache_type": options.cache_type})
    else:
        render.print_table(env, bench_tasks.TASK_COLUMNS, bench_tasks.task_rows(record))
    return ExitStatus.OK


@takes_settings("bench")
def bench(
    context: typer.Context,
    model: DefaultModelArgument = None,
    prompt_tokens: Annotated[int, typer.Option("--prompt-tokens", "-p", metavar="N",
                                               help="Prompt size in tokens.")] = 512,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-n", metavar="N",
                                            help="Tokens to generate.")] = 128,
    repetitions: Annotated[int, typer.Option(metavar="N",
                                             help="Measured runs after a warm-up.")] = 5,
    json_output: JsonOption = False,
    offline: OfflineOption = False,
    drop_all_caches: Annotated[bool, typer.Option(
        "--drop-all-caches", help="As root, empty the whole machine's page cache for the cold "
        "load when the model file's own pages cannot be dropped.")] = False,
    task: Annotated[str | None, typer.Option(
        metavar="GROUP", help="Instead: decode the shipped workloads of GROUP (grounded, open "
        "or all) with drafts off and on, side by side.")] = None,
    **flags: Any,
) -> None:
    """Measure prefill and decode speed, first-token latency, load time and memory."""
    from contextlib import nullcontext

    from localchat import bench as benchmark
    from localchat.config import load_config
    from localchat.models.catalog import resolve_model

    env, given, config = env_of(context), given_settings(flags), load_config()
    bench_settings = benchmark.BenchSettings(prompt_tokens, gen_tokens, repetitions,
                                             drop_all_caches=drop_all_caches)
    bench_settings.validate()  # before a download can start, like every flag
    if task is not None and task not in TASK_GROUPS:
        raise UsageError(f"--task must be one of {', '.join(TASK_GROUPS)} (got {task!r})")
    ref = resolve_model(model or config.model or DEFAULT_MODEL)
    values = settings.merge(given, config.settings, ref.defaults.settings)
    options = engine_options(values, ref, offline, env, verbose=False)
    if task is not None:
        raise typer.Exit(_bench_tasks(env, options, task, repetitions, json_output))
    bench_settings = replace(bench_settings, draft=values["draft"])
    bar = None
    if render.stderr_is_terminal(env):
        from rich.console import Console
        from rich.progress import Progress

        bar = Progress(console=Console(file=env.stderr), transient=True)
        bar_task = bar.add_task("bench", total=None)
    with bar or nullcontext():
        result = benchmark.run_benchmark(bench_settings, options, (
            lambda what, done, total: bar.update(bar_task, description=what, completed=done,
                                                 total=total)) if bar is not None else None)
    record = benchmark.bench_record(result)
    if json_output:
        render.print_json(env, record)
    else:
        render.print_table(env, ["figure", "median", "spread"],
                           [list(row) for row in benchmark.summary_rows(record)])
    if result.interrupted:
        render.print_note(env, "interrupted: the figures above are what was measured so far")
    raise typer.Exit(ExitStatus.INTERRUPTED if result.interrupted else ExitStatus.OK)


