"""`localchat run MODEL PROMPT`: one prompt in, one streamed reply out, for people and pipes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localchat.catalog import ModelDefaults
from localchat.config import Config
from localchat.engine import EngineOptions, LocalEngine, Sampling
from localchat.errors import ExitStatus, UsageError
from localchat.render import (
    Environment,
    TextSink,
    format_stats,
    print_json,
    print_note,
    read_piped_input,
    stats_record,
)


@dataclass(frozen=True)
class Request:
    """Everything one run needs, already merged from flags and config."""

    model: str
    prompt: str | None
    system: str | None
    sampling: Sampling
    engine: EngineOptions
    json_output: bool = False
    verbose: bool = False


def _pick(*candidates: Any) -> Any:
    """The first value that is set: flag, then config file, then catalog, then built-in."""
    return next((value for value in candidates if value is not None), None)


def sampling_from(config: Config, model: ModelDefaults, **flags: Any) -> Sampling:
    """Sampling settings from flags over config over the model's catalog defaults, validated."""
    builtin = Sampling()
    sampling = Sampling(
        temperature=_pick(flags["temperature"], config.temperature, model.temperature,
                          builtin.temperature),
        top_p=_pick(flags["top_p"], config.top_p, model.top_p, builtin.top_p),
        top_k=_pick(flags["top_k"], config.top_k, model.top_k, builtin.top_k),
        min_p=_pick(flags["min_p"], config.min_p, model.min_p, builtin.min_p),
        repeat_penalty=_pick(flags["repeat_penalty"], config.repeat_penalty,
                             model.repeat_penalty, builtin.repeat_penalty),
        seed=_pick(flags["seed"], config.seed),
        max_tokens=_pick(flags["max_tokens"], config.max_tokens),
        stop=flags["stop"],
        ignore_eos=flags["ignore_eos"],
    )
    sampling.validate()
    return sampling


def engine_options_from(config: Config, model: ModelDefaults, model_path: Path,
                        **flags: Any) -> EngineOptions:
    """Load options from flags over config over the model's catalog defaults, validated."""
    options = EngineOptions(
        model_path=model_path,
        n_ctx=_pick(flags["ctx"], config.ctx, model.ctx),
        threads=_pick(flags["threads"], config.threads),
        gpu_layers=_pick(flags["gpu_layers"], config.gpu_layers),
        cpu_only=flags["cpu"],
        use_mmap=_pick(flags["mmap"], config.mmap, True),
        use_mlock=flags["mlock"],
        chat_format=_pick(flags["chat_format"], config.chat_format),
        verbose=flags["verbose"],
    )
    options.validate()
    return options


def compose_prompt(piped: str | None, prompt: str | None) -> str:
    """Piped text first, then the prompt, separated by a blank line."""
    parts = [part.strip("\n") for part in (piped, prompt) if part and part.strip()]
    return "\n\n".join(parts)


def load_engine(options: EngineOptions) -> LocalEngine:
    """The one way a model gets loaded: validate the file's header, then hand it to llama.cpp."""
    from localchat.modelfile import read_model_file

    info = read_model_file(options.model_path)
    return LocalEngine(options, info)


def run_once(request: Request, env: Environment) -> int:
    """Generate one reply to the prompt; return the exit status."""
    text = compose_prompt(read_piped_input(env), request.prompt)
    if not text:
        raise UsageError(
            "nothing to send: the prompt is empty",
            'give a PROMPT, e.g. localchat run MODEL "hello", or pipe text on stdin',
        )
    engine = load_engine(request.engine)
    if request.verbose:
        info = engine.info
        print_note(env, f"model {info.model_path} · ctx {info.n_ctx} · {info.threads} threads · "
                        f"{info.backend} · chat template {info.chat_format} "
                        f"({info.chat_format_source})")
    messages = [{"role": "system", "content": request.system}] if request.system else []
    messages.append({"role": "user", "content": text})
    sink = None if request.json_output else TextSink(env)
    pieces: list[str] = []
    stream = engine.stream(messages, request.sampling)
    try:
        for piece in stream:
            pieces.append(piece)
            if sink:
                sink.write(piece)
    except KeyboardInterrupt:
        stream.close()
    stats = engine.last_stats
    if sink:
        sink.finish()
    if stats is None:  # interrupted before the prompt was even tokenized
        return ExitStatus.INTERRUPTED
    if request.json_output:
        print_json(env, stats_record("".join(pieces), engine.info, stats, request.model))
    elif request.verbose or stats.finish_reason == "interrupted":
        print_note(env, format_stats(engine.info, stats))
    return ExitStatus.INTERRUPTED if stats.finish_reason == "interrupted" else ExitStatus.OK
