"""The local engine: a GGUF model run by llama-cpp-python, streaming text with honest timing.

We drive llama.cpp's decode loop ourselves instead of using `Llama.create_completion`:
sampling stays in llama.cpp's sampler chain, each new token is detokenized once (the library
re-detokenizes the whole completion on every token), the KV cache of the shared prompt prefix
is reused between turns, and we know exactly how many tokens were reused and processed.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from localchat.engine import kv_reuse, reasoning, sampler_chain, speculative, templates
from localchat.engine.options import (
    CACHE_GGML_TYPES,
    DEFAULT_CONTEXT,
    EngineOptions,
    LoadInfo,
    context_hint,
)
from localchat.engine.prompt_tokens import PromptTokenizer
from localchat.engine.protocol import (
    GenerationStats,
    ReplyOptions,
    Sampling,
    TokenLogprob,
    answer_only,
)
from localchat.engine.reasoning import REASONING, Family, Part, Thinking
from localchat.engine.reply_text import ReplyText
from localchat.engine.runtime import (
    compiled_backend,
    deferred_interrupts,
    import_llama_cpp,
    physical_core_count,
    route_llama_logs,
)
from localchat.engine.speculative import DraftCounters, DraftPolicy, Stepper
from localchat.errors import ContextOverflowError, EngineError, UsageError

if TYPE_CHECKING:
    from llama_cpp._internals import LlamaSampler

    from localchat.engine.grammar import OutputGrammar
    from localchat.engine.grammar_sampler import GrammarSampler
    from localchat.models.gguf_reader import ModelInfo

@dataclass
class _Cursor:
    """Per-reply bookkeeping shared between the decode loop and its `finally`."""

    started: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prefill_s: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    finish_reason: str = "interrupted"
    reasoning_tokens: int = 0
    thought: int = 0  # tokens inside the block since it opened, for the budget
    answer_at: int | None = None  # where the answer starts in the KV cache
    draft: DraftCounters = field(default_factory=DraftCounters)


class LocalEngine:
    """A loaded model: format chats, count tokens, and stream replies."""

    def __init__(self, options: EngineOptions, model_info: ModelInfo) -> None:
        """Load the model; `model_info` is the validated header."""
        options.validate()
        llama_cpp = import_llama_cpp()
        route_llama_logs(llama_cpp, options.verbose)
        self.options = options
        n_ctx_train = model_info.context_length  # None: the file does not say
        n_ctx = options.n_ctx or min(n_ctx_train or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
        threads = options.threads or physical_core_count()
        gpu = llama_cpp.llama_supports_gpu_offload() and not options.cpu_only
        gpu_layers = 0 if not gpu else (-1 if options.gpu_layers is None else options.gpu_layers)
        self.template = templates.choose_template(
            model_info.chat_template, model_info.architecture,
            model_info.special_tokens, options.chat_format,
        )
        templates.check(self.template)
        started = time.perf_counter()
        try:
            with deferred_interrupts():
                self._llama = llama_cpp.Llama(
                    model_path=str(options.model_path), n_ctx=n_ctx, n_batch=options.batch_size,
                    n_threads=threads, n_threads_batch=threads, n_gpu_layers=gpu_layers,
                    use_mmap=options.use_mmap, use_mlock=options.use_mlock,
                    flash_attn=options.flash_attn, type_k=CACHE_GGML_TYPES[options.cache_type],
                    type_v=CACHE_GGML_TYPES[options.cache_type], verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(
                f"llama.cpp could not load {options.model_path}: {exc}",
                "run with --verbose to see llama.cpp's log; the file may be damaged or "
                "need a newer llama.cpp",
            ) from exc
        load_s = time.perf_counter() - started
        self._llama_cpp = llama_cpp
        self._vocab = self._llama._model.vocab
        self._tokenizer = PromptTokenizer(llama_cpp, self._vocab)
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._pieces: dict[int, bytes] = {}
        model = self._llama._model
        self._bos_text = model.token_get_text(model.token_bos()) if model.token_bos() >= 0 else ""
        self._eos_text = model.token_get_text(model.token_eos()) if model.token_eos() >= 0 else ""
        self.info = LoadInfo(
            # llama.cpp may round the window up, but llama-cpp-python sizes its token
            # arrays by what we asked for, so that is the real limit.
            model_path=options.model_path, load_s=load_s, n_ctx=min(n_ctx, self._llama.n_ctx()),
            n_ctx_train=n_ctx_train, threads=threads,
            gpu_layers=(model_info.block_count or 0) + 1 if gpu_layers == -1 else gpu_layers,
            backend=compiled_backend() if gpu else "CPU", chat_format=self.template.name,
            chat_format_source=self.template.source, use_mmap=options.use_mmap,
            flash_attn=options.flash_attn, cache_type=options.cache_type,
            # the cells llama.cpp allocated (n_ctx, maybe rounded up), of the type asked for
            kv_cache_bytes=_kv_cache_bytes(model_info, self._llama.n_ctx(), options.cache_type),
            inexact_drafts=speculative.inexact_reason(gpu_layers != 0, threads,
                                                      options.flash_attn, options.cache_type),
        )
        self.thinking: Thinking | None = templates.thinking_of(
            self.template, model_info.special_tokens, options.thinking, self._bos_text,
            self._eos_text)
        self.last_stats: GenerationStats | None = None
        self._last_reply: kv_reuse.LastReply | None = None  # for reuse past dropped thinking
        # The reply's tokens with their log-probabilities, when `ReplyOptions.logprobs` asks;
        # filled as the reply streams, so a reader can take each token as its text arrives.
        self.token_logprobs: list[TokenLogprob] = []
        # What drafting has learnt (acceptance, batch cost) carries over from reply to reply.
        self._policy = DraftPolicy()
        self._batch_check = speculative.BatchCheck()  # what `--draft auto` measured here

    def format_prompt(self, messages: Sequence[dict[str, Any]], think: bool | None = None,
                      tools: Sequence[Mapping[str, Any]] = ()) -> str:
        """The chat template applied to `messages`, ending where the assistant's reply starts."""
        return templates.render(self.template, messages, self._bos_text, self._eos_text,
                                think=think, tools=tools)

    def tokenize_messages(self, messages: Sequence[dict[str, Any]], think: bool | None = None,
                          tools: Sequence[Mapping[str, Any]] = ()) -> list[int]:
        """Tokens of the formatted prompt, one BOS at most; control tokens come from the
        template's own text only, never from a message's content (see prompt_tokens)."""
        return self._tokenize_pieces(self._prompt_pieces(messages, think, tools))

    def _prompt_pieces(self, messages: Sequence[dict[str, Any]], think: bool | None,
                       tools: Sequence[Mapping[str, Any]] = ()) -> list[tuple[str, bool]]:
        self._check_open()
        return templates.render_pieces(self.template, messages, self._bos_text,
                                       self._eos_text, think=think, tools=tools)

    def _tokenize_pieces(self, pieces: list[tuple[str, bool]]) -> list[int]:
        add_bos = not (self._bos_text and pieces and pieces[0][0].startswith(self._bos_text)
                       and not pieces[0][1])
        return self._tokenizer.tokenize_pieces(pieces, add_special=add_bos)

    def count_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        """How many tokens `messages` take in the context window."""
        return len(self.tokenize_messages(messages))

    @property
    def n_ctx(self) -> int:
        """The context window size in tokens."""
        return self.info.n_ctx

    def stream(self, messages: Sequence[dict[str, Any]], sampling: Sampling,
               options: ReplyOptions | None = None) -> Generator[str, None, None]:
        """Yield the reply's answer as text pieces; `last_stats` is set when it ends."""
        return answer_only(self.stream_parts(messages, sampling, options))

    def stream_parts(self, messages: Sequence[dict[str, Any]], sampling: Sampling,
                     options: ReplyOptions | None = None) -> Generator[Part, None, None]:
        """Yield the reply as parts, thinking apart from the answer; `last_stats` is set when
        the generator ends. `options`: tools for the template, logit bias, logprobs (API
        requests)."""
        options = options or ReplyOptions()
        thinking = self.thinking
        if sampling.think is False and thinking is not None and thinking.switch is None:
            raise UsageError(
                "this model cannot switch its thinking off: its chat template has no "
                f"switch ({', '.join(reasoning.SWITCHES)})",
                "use --think-budget 0 (/think budget 0 in the chat) to make it answer at once")

        def tokenize() -> tuple[list[int], bool]:
            pieces = self._prompt_pieces(messages, sampling.think, options.tools)
            text = "".join(piece for piece, _ in pieces)
            inside = thinking is not None and reasoning.opens_block(text, thinking.family)
            return self._tokenize_pieces(pieces), inside

        return self._stream(tokenize, sampling, options, chat=True)

    def stream_text(self, prompt: str, sampling: Sampling,
                    options: ReplyOptions | None = None) -> Generator[str, None, None]:
        """Continue raw text with no chat template (`/v1/completions`, base models)."""
        # special=True: a raw prompt may spell out a template's tokens, as llama-server allows
        return answer_only(self._stream(
            lambda: (self._tokenizer.tokenize(prompt.encode("utf-8"), add_special=True,
                                              parse_special=True), False),
            sampling, options or ReplyOptions(), chat=False))

    def _stream(self, tokenize: Callable[[], tuple[list[int], bool]], sampling: Sampling,
                options: ReplyOptions, chat: bool) -> Generator[Part, None, None]:
        self._check_open()
        sampling.validate()
        self._check_reply_options(options)
        cursor = _Cursor(started=time.perf_counter())
        tokens, inside = tokenize()
        cursor.prompt_tokens = len(tokens)
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(tokens)} tokens but the context window is {self.n_ctx}",
                context_hint(self.n_ctx, self.info.n_ctx_train, "shorten the input"),
            )
        return self._generate(tokens, sampling, options, cursor, chat, inside)

    def _generate(self, tokens: list[int], sampling: Sampling, options: ReplyOptions,
                  cursor: _Cursor, chat: bool, inside: bool) -> Generator[Part, None, None]:
        self.token_logprobs = []
        try:
            yield from self._decode(tokens, sampling, options, cursor, chat, inside)
        finally:
            self.last_stats = self._stats(cursor)
            self._last_reply = kv_reuse.LastReply(cursor.prompt_tokens, cursor.answer_at)

    def _decode(self, tokens: list[int], sampling: Sampling, options: ReplyOptions,
                cursor: _Cursor, chat: bool, inside: bool) -> Generator[Part, None, None]:
        llama = self._llama
        cursor.cached_tokens = self._reuse_prefix(tokens)
        sampler = self._sampler(sampling, options)
        family = self.thinking.family if chat and self.thinking else None
        reply = ReplyText(tuple(sampling.stop) + (self.template.stops if chat else ()),
                          family, inside, strip_leading=chat)
        # A character split across tokens waits for its last byte; one cut off by the end of
        # the reply is dropped, never shown as U+FFFD (invalid bytes mid-reply still are).
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        prefill_started = time.perf_counter()
        llama.eval(tokens[cursor.cached_tokens:])
        cursor.prefill_s = time.perf_counter() - prefill_started
        # Log-probabilities read the logits of the one position just evaluated: no drafts then.
        drafts = options.logprobs is None and speculative.drafts(sampling.draft,
                                                                 self.info.inexact_drafts)
        check = self._batch_check if sampling.draft == "auto" else None
        steps = Stepper(llama, self._llama_cpp, sampler, tokens if drafts else None, self.n_ctx,
                        self._policy, check=check,
                        # the chain's logit bias is the end-of-turn ban alone: argmax may stand in
                        eog_banned=sampling.ignore_eos and bool(self._end_of_generation_tokens)
                        and not options.logit_bias)
        try:
            while True:
                budget = sampling.think_budget
                if budget is not None and reply.thinking and cursor.thought >= budget:
                    assert family is not None  # only a thinking model's reply can be thinking
                    decoder.reset()  # a character cut by the budget is dropped, as at the end
                    if not self._close_thinking(family, sampler, cursor,
                                                sampling.max_tokens or self.n_ctx, steps):
                        cursor.finish_reason = "length"
                        break
                    yield from reply.feed(family.close_text)
                token = steps.sample()
                now = time.perf_counter()
                cursor.first_token_at = cursor.first_token_at or now
                if not sampling.ignore_eos and self._llama_cpp.llama_vocab_is_eog(self._vocab,
                                                                                  token):
                    cursor.finish_reason = "stop"
                    break
                cursor.last_token_at = now  # the end-of-turn token is not part of the reply
                cursor.completion_tokens += 1
                if options.logprobs is not None:
                    self.token_logprobs.append(sampler_chain.token_logprob(
                        self._llama_cpp, self._llama, token, options.logprobs, self._piece))
                was_thinking = reply.thinking
                parts = reply.feed(decoder.decode(self._piece(token)))
                if was_thinking or reply.thinking:
                    cursor.reasoning_tokens += 1
                    cursor.thought += was_thinking and reply.thinking
                    if not reply.thinking:  # this token closed the block; the answer comes next
                        cursor.answer_at = llama.n_tokens + 1
                for part in parts:
                    yield Part(REASONING, part.text, cursor.reasoning_tokens) \
                        if part.kind == REASONING else part
                if reply.stopped:
                    cursor.finish_reason = "stop"
                    break
                if sampling.max_tokens and cursor.completion_tokens >= sampling.max_tokens:
                    cursor.finish_reason = "length"
                    break
                if llama.n_tokens + 1 >= self.n_ctx:  # prompt + reply fill the window, no more
                    cursor.finish_reason = "context"
                    break
                steps.advance(token, sampling.max_tokens - cursor.completion_tokens
                              if sampling.max_tokens else None)
        finally:
            steps.finish()  # the KV cache holds exactly input_ids[:n_tokens], drafts or not
            cursor.draft = steps.counters
            if check is not None and check.failed and not self.info.inexact_drafts:
                self.info = replace(self.info, inexact_drafts=check.failed)
        if cursor.finish_reason in ("length", "context") and reply.thinking:
            cursor.finish_reason = "thinking"  # out of tokens before the answer began
        if not reply.stopped:
            yield from reply.finish()

    def _reuse_prefix(self, tokens: list[int]) -> int:
        """Keep the KV cache of what `tokens` shares with it; return how many tokens it covers."""
        last, self._last_reply = self._last_reply, None
        can_shift = bool(self._llama_cpp.llama_memory_can_shift(self._llama._ctx.memory))
        return kv_reuse.reuse(self._llama, tokens, last, can_shift)

    @functools.cached_property
    def _end_of_generation_tokens(self) -> tuple[int, ...]:
        # Scanned once: asking about each of a 50k vocabulary takes ~30 ms of ctypes calls.
        is_eog, vocab = self._llama_cpp.llama_vocab_is_eog, self._vocab
        return tuple(t for t in range(self._llama.n_vocab()) if is_eog(vocab, t))

    def _check_reply_options(self, options: ReplyOptions) -> None:
        n_vocab = self._llama.n_vocab()
        wrong = [token for token in options.logit_bias if not 0 <= token < n_vocab]
        if wrong:
            raise UsageError(f"logit_bias names token {wrong[0]}, but this model's vocabulary "
                             f"has tokens 0 to {n_vocab - 1}")

    def _sampler(self, sampling: Sampling, options: ReplyOptions
                 ) -> LlamaSampler | GrammarSampler:
        """The sampler of one reply: llama.cpp's chain, with the grammar when there is one."""
        n_vocab = self._llama.n_vocab()
        chain = sampler_chain.chain(n_vocab, sampling, options.logit_bias,
                                    self._end_of_generation_tokens if sampling.ignore_eos else ())
        return sampler_chain.with_grammar(self._llama_cpp, self._vocab, chain, sampling.grammar,
                                          n_vocab)

    def check_grammar(self, grammar: OutputGrammar) -> None:
        """Raise UsageError (llama.cpp's own message, on one line) if `grammar` does not parse."""
        from localchat.engine.grammar_sampler import init_grammar

        self._check_open()
        self._llama_cpp.llama_sampler_free(init_grammar(self._llama_cpp, self._vocab, grammar))

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buffer = self._piece_buffer
            n = self._llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0,
                                                     False)
            piece = buffer.raw[: max(n, 0)]
            self._pieces[token] = piece
        return piece

    def _close_thinking(self, family: Family, sampler: Any, cursor: _Cursor,
                        limit: int, steps: Stepper) -> bool:
        """The thinking budget is spent: evaluate the closing marker's tokens as if the model had
        written them, so that it answers next. False when no room is left for an answer."""
        closing = self._llama.tokenize(family.close_text.encode("utf-8"), add_bos=False,
                                       special=True)
        room = min(limit - cursor.completion_tokens, self.n_ctx - 1 - self._llama.n_tokens)
        if len(closing) >= room:
            return False
        self._llama.eval(closing)  # first drops the cells of a draft not taken
        steps.evaluated(closing)
        for token in closing:
            sampler.accept(token)  # as a sampled token is, for the repeat penalties
        cursor.completion_tokens += len(closing)
        cursor.reasoning_tokens += len(closing)
        cursor.answer_at = self._llama.n_tokens
        return True

    @staticmethod
    def _stats(cursor: _Cursor) -> GenerationStats:
        first = cursor.first_token_at
        return GenerationStats(
            prompt_tokens=cursor.prompt_tokens,
            cached_tokens=cursor.cached_tokens,
            completion_tokens=cursor.completion_tokens,
            ttft_s=(first - cursor.started) if first else 0.0,
            prefill_s=cursor.prefill_s,
            decode_s=(cursor.last_token_at - first) if first and cursor.last_token_at else 0.0,
            finish_reason=cursor.finish_reason,
            reasoning_tokens=cursor.reasoning_tokens,
            draft_tokens=cursor.draft.drafted,
            draft_accepted=cursor.draft.accepted,
            draft_steps=cursor.draft.steps,
        )

    def keep_cache_for(self, messages: Sequence[dict[str, str]]) -> None:
        """Keep only the KV cache a prompt for `messages` would reuse: before a snapshot, so
        that it holds the last answer without the thinking the template will drop."""
        self._reuse_prefix(self.tokenize_messages(messages))

    def reset_cache(self) -> None:
        """Forget the KV cache, so the next prompt is evaluated from its first token."""
        self._llama.reset()
        self._last_reply = None

    def export_state(self, limit: int | None = None) -> tuple[list[int], bytearray]:
        """The tokens in the KV cache and llama.cpp's serialized cache of them, for a snapshot;
        `limit` first cuts the cache to its first `limit` tokens (a one-shot's fixed prefix)."""
        llama, ctx = self._llama, self._llama._ctx.ctx
        if limit is not None:
            llama.n_tokens = min(llama.n_tokens, limit)
        # Only sequence 0's KV cells, no logits: the next reply re-evaluates its last prompt token.
        llama._ctx.kv_cache_seq_rm(-1, llama.n_tokens, -1)  # cells past n_tokens are stale
        tokens = llama.input_ids[: llama.n_tokens].tolist()
        size = self._llama_cpp.llama_state_seq_get_size(ctx, 0)
        data = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(data)
        written = self._llama_cpp.llama_state_seq_get_data(ctx, view, size, 0)
        del view  # a bytearray cannot shrink while a ctypes view holds its buffer
        if not 0 < written <= size:
            raise EngineError("llama.cpp could not copy its KV cache state")
        del data[written:]
        return tokens, data

    def import_state(self, tokens: Sequence[int], data: bytes | bytearray | memoryview) -> None:
        """Load what `export_state` gave; the next reply reuses the KV cache of `tokens`."""
        llama = self._llama
        if not 0 < len(tokens) < self.n_ctx:
            raise EngineError(f"a saved state of {len(tokens)} tokens does not fit n_ctx "
                              f"{self.n_ctx}")
        llama.reset()
        self._last_reply = None
        array = ctypes.c_uint8 * len(data)
        try:
            view = array.from_buffer(data)  # no copy; ctypes insists on a writable buffer
        except TypeError:
            view = array.from_buffer_copy(data)
        # llama.cpp checks the layout (layers, types, row sizes, cell count) and, on a mismatch,
        # empties the sequence and returns 0 rather than loading half a cache.
        loaded = self._llama_cpp.llama_state_seq_set_data(llama._ctx.ctx, view, len(data), 0)
        del view  # let go of the caller's buffer (an mmap cannot close while one is held)
        if not loaded:
            llama._ctx.kv_cache_seq_rm(-1, 0, -1)
            raise EngineError("llama.cpp refused the saved KV cache state")
        llama.input_ids[: len(tokens)] = tokens
        llama.n_tokens = len(tokens)

    def close(self) -> None:
        """Free the model and its context now rather than at garbage collection."""
        self._closed = True
        self._llama.close()

    def _check_open(self) -> None:
        # llama.cpp dereferences freed memory (a segfault) when a closed model is used
        if getattr(self, "_closed", False):
            raise EngineError("the model was already unloaded", "load it again")


def _kv_cache_bytes(model_info: Any, n_ctx: int, cache_type: str) -> int | None:
    from localchat.models.gguf_reader import estimate_memory

    estimate = estimate_memory(model_info, n_ctx, cache_type)
    return estimate.kv_cache_bytes if estimate.kv_cache_known else None
