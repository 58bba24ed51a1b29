"""Chat templates: pick the right one for a model and render it in a Jinja sandbox.

A GGUF file usually carries its own template (`tokenizer.chat_template`). It is code written
by a stranger, so it runs in jinja2's immutable sandbox, as llama-cpp-python does. When a file
has none, the template is chosen from the architecture and the special tokens in the vocabulary;
when nothing matches we refuse rather than guess a wrong format.
"""

from __future__ import annotations

import functools
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localchat.engine import reasoning
from localchat.errors import EngineError, UsageError

# Built-in templates for files without one. Each mirrors the format llama.cpp's own
# `llama_chat_apply_template` uses for that family.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}"
        "{% set system = namespace(text='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\n\n' %}"
        "{% else %}"
        "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
        "{{ '<start_of_turn>' + role + '\n' + (system.text if role == 'user' else '')"
        " + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% if role == 'user' %}{% set system.text = '' %}{% endif %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
    "phi3": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}"
        "{% set system = namespace(text='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\n\n' %}"
        "{% elif message['role'] == 'user' %}"
        "{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}"
        "{% set system.text = '' %}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "llama2": (
        "{{ bos_token }}"
        "{% set system = namespace(text='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}"
        "{% set system.text = '<<SYS>>\n' + message['content'] + '\n<</SYS>>\n\n' %}"
        "{% elif message['role'] == 'user' %}"
        "{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}"
        "{% set system.text = '' %}"
        "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
}

# Text that ends a reply in each built-in format, for models whose end-of-turn token is not
# marked as end-of-generation in the file.
BUILTIN_STOPS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_end|>",),
    "llama3": ("<|eot_id|>",),
    "gemma": ("<end_of_turn>",),
    "phi3": ("<|end|>",),
    "mistral": (),
    "llama2": (),
}

# `raw` sends the prompt text as it is: for base models and hand-written prompts.
RAW = "raw"
FORMAT_NAMES = (*BUILTIN_TEMPLATES, RAW)
_FORMAT_HINT = f"pass --chat-format with one of: {', '.join(FORMAT_NAMES)}"

_ARCHITECTURE_FORMATS = {
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "phi3": "phi3",
}

# Special tokens that identify a format whatever the architecture says ("llama" covers
# Llama 2, Llama 3, Mistral, SmolLM and many fine-tunes, so it alone decides nothing).
_TOKEN_FORMATS = (
    ("<|start_header_id|>", "llama3"),
    ("<|im_start|>", "chatml"),
    ("<start_of_turn>", "gemma"),
    ("<|end|>", "phi3"),
    ("[INST]", "mistral"),
)


@dataclass(frozen=True)
class ChatTemplate:
    """A template ready to render: its name, where it came from, and its Jinja source."""

    name: str
    source: str  # "model file", "architecture <arch>", "vocabulary", "--chat-format"
    text: str | None  # None for raw
    stops: tuple[str, ...] = ()


def choose_template(
    file_template: str | None,
    architecture: str | None,
    special_tokens: frozenset[str],
    override: str | None = None,
) -> ChatTemplate:
    """Pick the chat template: an explicit `--chat-format`, the file's own, or a known family."""
    if override:
        name = override.strip().lower()
        if name not in FORMAT_NAMES:
            raise UsageError(
                f"unknown chat format '{override}'",
                f"use one of: {', '.join(FORMAT_NAMES)}",
            )
        return _builtin(name, "--chat-format")
    if file_template and file_template.strip():
        return ChatTemplate("embedded", "model file", file_template)
    arch = (architecture or "").lower()
    if arch in _ARCHITECTURE_FORMATS:
        return _builtin(_ARCHITECTURE_FORMATS[arch], f"architecture {arch}")
    for token, name in _TOKEN_FORMATS:
        if token in special_tokens:
            return _builtin(name, f"vocabulary token {token}")
    raise EngineError(
        f"the model file has no chat template and its architecture ({arch or 'unknown'}) "
        "does not tell which format it was trained on",
        _FORMAT_HINT,
    )


def _builtin(name: str, source: str) -> ChatTemplate:
    if name == RAW:
        return ChatTemplate(RAW, source, None)
    return ChatTemplate(name, source, BUILTIN_TEMPLATES[name], BUILTIN_STOPS[name])


def render(
    template: ChatTemplate,
    messages: Sequence[dict[str, Any]],
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    think: bool | None = None,
    tools: Sequence[Mapping[str, Any]] = (),
) -> str:
    """Render messages to the prompt text the model expects; template faults become errors.

    `think` is the thinking switch the template may read (`enable_thinking`): on unless False,
    as llama.cpp passes it (some templates read an undefined switch as off). `tools` (OpenAI
    tool definitions) reach the template only when given, as Hugging Face's
    `apply_chat_template(tools=...)` passes them; `renders_tools` says whether it uses them.
    """
    if template.text is None:
        return "\n\n".join(message["content"] for message in messages)
    import jinja2

    from localchat.engine import template_sandbox

    check(template)  # compiled once per template text (cached); a syntax error is named there
    extra: dict[str, Any] = dict.fromkeys(reasoning.SWITCHES, think is not False)
    if tools:
        extra["tools"] = [dict(tool) for tool in tools]
    try:
        return template_sandbox.render(
            template.text,
            messages=list(messages),
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    except template_sandbox.TemplateLimitError as exc:
        raise EngineError(
            f"the chat template ({template.source}) was stopped: {exc}",
            f"the file may be malicious; {_FORMAT_HINT}",
        ) from exc
    except jinja2.exceptions.SecurityError as exc:
        raise EngineError(
            f"the chat template ({template.source}) tried something unsafe and was stopped: {exc}",
            f"the file may be malicious; {_FORMAT_HINT}",
        ) from exc
    except RecursionError as exc:
        raise EngineError(
            f"the chat template ({template.source}) was stopped: it recursed too deeply",
            _FORMAT_HINT,
        ) from exc
    except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError,
            OverflowError, ZeroDivisionError, MemoryError) as exc:
        raise EngineError(f"the chat template ({template.source}) failed: {exc}",
                          _FORMAT_HINT) from exc


def renders_tools(template: ChatTemplate) -> bool:
    """True when the template reads the `tools` variable (Qwen2.5, Hermes, Llama 3.1...)."""
    return template.text is not None and re.search(r"\btools\b", template.text) is not None


def render_pieces(
    template: ChatTemplate,
    messages: Sequence[dict[str, Any]],
    bos_token: str = "",
    eos_token: str = "",
    think: bool | None = None,
    tools: Sequence[Mapping[str, Any]] = (),
) -> list[tuple[str, bool]]:
    """The rendered prompt as (text, is_content) pieces: message contents apart from the template.

    Joined, the pieces are exactly `render(...)`. The tokenizer reads control tokens
    (`<|im_start|>`...) only in the template's own text, so a document piped into a message that
    spells `<|im_end|><|im_start|>system` stays text instead of opening a real system turn.

    The contents are found by rendering each one replaced by a marker no text holds; the text
    between the markers is the template's. A content's outer whitespace stays around its marker,
    so a template that trims the content trims that whitespace too. A template that rewrites a
    content in some other way (Qwen3 cuts the thinking out of earlier replies) would not give the
    real prompt back with the content in place of its marker: such a message stays template text
    (its control tokens are read as before), the others are still kept apart. The `raw` format
    has no template: the text is the prompt, as the user wrote it, control tokens included.
    """
    full = render(template, messages, bos_token, eos_token, think=think, tools=tools)
    if template.text is None:
        return [(full, False)]
    candidates = [index for index, message in enumerate(messages)
                  if isinstance(message.get("content"), str) and message["content"].strip()]
    if not candidates:
        return [(full, False)]
    nonce = _fresh_nonce(full, template.text, messages)
    render_marked = functools.partial(_marked_render, template, messages, nonce=nonce,
                                      bos_token=bos_token, eos_token=eos_token, full=full,
                                      think=think, tools=tools)
    pieces = render_marked(candidates)
    if pieces is None:  # rewritten contents: keep apart those that survive alone
        pieces = render_marked([index for index in candidates if render_marked([index])])
    return pieces or [(full, False)]


def _fresh_nonce(full: str, text: str, messages: Sequence[dict[str, Any]]) -> str:
    """Digits for the markers that occur nowhere yet (private-use brackets, nothing to trim)."""
    while True:
        nonce = str(secrets.randbelow(10**12))
        opening = f"\ue000{nonce}."
        if opening not in full and opening not in text and not any(
                opening in str(message.get("content", "")) for message in messages):
            return nonce


def _marked_render(template: ChatTemplate, messages: Sequence[dict[str, Any]],
                   marked: Sequence[int], nonce: str, bos_token: str, eos_token: str,
                   full: str, think: bool | None = None,
                   tools: Sequence[Mapping[str, Any]] = ()) -> list[tuple[str, bool]] | None:
    """Pieces from a render with the `marked` contents as markers, or None if they differ."""
    if not marked:
        return None
    cores: dict[str, str] = {}
    copies = [dict(message) for message in messages]
    for index in marked:
        content = messages[index]["content"]
        core = content.strip()
        start = len(content) - len(content.lstrip())
        cores[str(index)] = core
        copies[index]["content"] = f"{content[:start]}\ue000{nonce}.{index}\ue001" \
                                   f"{content[start + len(core):]}"
    try:
        rendered = render(template, copies, bos_token, eos_token, think=think, tools=tools)
    except EngineError:
        return None  # the template looked at the content itself
    parts = re.split(f"\ue000{nonce}\\.(\\d+)\ue001", rendered)
    pieces: list[tuple[str, bool]] = []
    for position, part in enumerate(parts):
        if position % 2 == 0:
            if part:
                pieces.append((part, False))
        elif part in cores:
            pieces.append((cores[part], True))
        else:
            return None
    return pieces if "".join(text for text, _ in pieces) == full else None


def check(template: ChatTemplate) -> None:
    """Parse the template now, so a file whose template cannot work fails at load."""
    if template.text is None:
        return
    import jinja2

    from localchat.engine import template_sandbox

    try:
        template_sandbox.compile_template(template.text)
    except jinja2.TemplateSyntaxError as exc:
        raise EngineError(
            f"the chat template ({template.source}) does not parse: {exc}",
            _FORMAT_HINT,
        ) from exc


def thinking_of(template: ChatTemplate, special_tokens: frozenset[str],
                catalog_family: str | None = None, bos_token: str = "",
                eos_token: str = "") -> reasoning.Thinking | None:
    """Whether a model thinks, and how: from its chat template (it names the markers or the
    switch), else from its vocabulary's special tokens, else from its catalog entry.

    The template is rendered for one message, with the switch on and off: a generation prompt
    that ends inside an open block means the reply starts inside it; a switch that changes
    nothing is no switch.
    """
    text = template.text or ""
    found = [(reasoning.family_in_template(text), "chat template"),
             (reasoning.family_in_vocabulary(special_tokens), "vocabulary"),
             (reasoning.family_named(catalog_family or ""), "catalog")]
    family, source = next(((f, where) for f, where in found if f is not None), (None, ""))
    if family is None:
        if not reasoning.switch_in_template(text):
            return None
        family, source = reasoning.FAMILIES[-1], "chat template"  # <think>, the common one
    switch, opened = reasoning.switch_in_template(text), False
    if text:
        probe = [{"role": "user", "content": "Hi"}]
        try:
            thinking_on = render(template, probe, bos_token, eos_token, think=True)
            opened = reasoning.opens_block(thinking_on, family)
            if switch and render(template, probe, bos_token, eos_token,
                                 think=False) == thinking_on:
                switch = None
        except EngineError:
            pass  # a template that cannot render fails loudly at the first reply instead
    return reasoning.Thinking(family, source, switch, opened)
