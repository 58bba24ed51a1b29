"""What the commands share: the common arguments and options, the flags the settings table
generates (and their checking), and the Environment `cli.main` hands down through click."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, get_args

import typer
from typer.models import OptionInfo

from localchat import settings
from localchat.errors import LocalchatError, UsageError
from localchat.render import Environment

DEFAULT_MODEL = "smollm2"
SOURCES = ("Each setting comes from its flag, else config.toml, else the model's catalog "
           "defaults (models.toml), else the built-in default shown.")


def env_of(context: typer.Context) -> Environment:
    """The Environment `main` was given, which click hands from context to sub-context."""
    env = context.obj
    assert isinstance(env, Environment), "commands run through cli.main"
    return env


def complete_model(incomplete: str) -> list[str]:
    """Shell completion for MODEL: catalog names and tags, and models on disk."""
    try:
        from localchat.models.catalog import completion_names
        from localchat.models.store import list_local_models

        names = completion_names() + [model.name for model in list_local_models()]
    except LocalchatError:
        return []
    return sorted({name for name in names if name.startswith(incomplete)})


ModelArgument = Annotated[str, typer.Argument(
    metavar="MODEL", help="Catalog name[:tag], owner/repo:QUANT, or a .gguf path.",
    autocompletion=complete_model)]
DefaultModelArgument = Annotated[str | None, typer.Argument(
    metavar="MODEL", help="As for run. [default: smollm2]", autocompletion=complete_model)]
OfflineOption = Annotated[bool, typer.Option("--offline", help="Never touch the network.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v",
                                             help="Load details and llama.cpp's log on stderr.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


# ---- flags from the settings table -------------------------------------------------------------

def _setting_option(setting: settings.Setting) -> inspect.Parameter:
    """The typer option of a settings row; None means "not given", so config and catalog count."""
    kind: Any = {"int": int, "float": float, "bool": bool, "str": str, "list": list[str]}[
        setting.kind]
    metavar = None if setting.kind == "bool" else setting.metavar or {
        "int": "N", "float": "NUMBER"}.get(setting.kind, "TEXT")
    option = typer.Option(*setting.flags, metavar=metavar, show_default=False,
                          help=f"{setting.help} [default: {setting.default_text}]")
    return inspect.Parameter(setting.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                             default=None, annotation=Annotated[kind | None, option])


def takes_settings(command: settings.Command) -> Callable[[Any], Any]:
    """Give a command one flag per settings row it takes, after its arguments; the values reach
    its `**flags` by row name (typer reads the parameters from `__signature__`)."""
    def decorate(function: Any) -> Any:
        signature = inspect.signature(function, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        first_option = next(i for i, p in enumerate(own) if any(
            isinstance(info, OptionInfo) for info in get_args(p.annotation)[1:]))
        table = [_setting_option(setting) for setting in settings.for_command(command)]
        function.__signature__ = signature.replace(
            parameters=[*own[:first_option], *table, *own[first_option:]])
        return function
    return decorate


def given_settings(flags: dict[str, Any]) -> dict[str, Any]:
    """The settings flags that were given, checked; a bad one is a usage error naming its flag."""
    given = {}
    for name, value in flags.items():
        setting = settings.get(name)
        if value is None or value == [] or setting.switch and value is False:
            continue  # not given: config.toml, the catalog or the built-in default decides
        if setting.kind == "list":
            value = [settings.unescape(item) for item in value]
        try:
            given[name] = settings.checked(setting, value)
        except settings.Invalid as problem:
            raise UsageError(f"{setting.flag_name} {problem}") from None
    return given


def spelled(setting: settings.Setting, value: object) -> str:
    """A flag as the user typed it: `--no-mmap` for a pair given False."""
    positive, _, negative = setting.flags[0].partition("/")
    return negative if negative and value is False else positive
