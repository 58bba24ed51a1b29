"""Prompt-lookup drafts: the drafter and the policy alone, then the real model, where drafting
must never change a reply (greedy or sampled with a seed, stops, limits, end of turn, a grammar,
penalties) and must leave the KV cache holding exactly the reply's tokens."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from localchat.engine import speculative
from localchat.engine.local import LocalEngine
from localchat.engine.options import EngineOptions
from localchat.engine.protocol import Sampling
from localchat.engine.speculative import DraftPolicy, NgramDrafter
from localchat.models.gguf_reader import read_model_file

# ---- the drafter and the policy, no model ---------------------------------------------------


def test_the_drafter_continues_the_latest_earlier_occurrence_of_the_longest_suffix():
    drafter = NgramDrafter([9, 2, 3, 4, 5, 8, 2, 3, 4, 6, 7, 1, 2, 3, 4])
    # "1 2 3 4" never occurred before; "2 3 4" did, twice: the latest was followed by "6 7"
    assert drafter.propose(3) == (3, [6, 7, 1])
    drafter.push(6)
    assert drafter.propose(10) == (4, [7, 1, 2, 3, 4, 6])  # a draft may run into recent tokens


def test_the_drafter_has_nothing_for_a_new_token_and_respects_the_limit():
    drafter = NgramDrafter([5, 6, 7, 8])
    assert drafter.propose(4) == (0, [])
    drafter.push(5)
    assert drafter.propose(2) == (1, [6, 7])
    assert NgramDrafter([]).propose(4) == (0, [])


def test_the_policy_drafts_long_when_drafts_are_right_and_cheap():
    policy = DraftPolicy(cost=0.1)
    for _ in range(20):
        policy.record(3, 8, 8)
    assert policy.acceptance(3) > 0.9
    assert policy.size(3, 16) >= 8
    assert policy.size(3, 2) == 2  # never more than the drafter has


def test_the_policy_pauses_when_drafts_are_wrong_or_batches_dear():
    policy = DraftPolicy(cost=0.1)
    for _ in range(20):
        policy.record(1, 4, 0)
    assert policy.size(1, 16) == 0
    dear = DraftPolicy(cost=1.0)  # a batch costs as much as its tokens one by one
    for _ in range(20):
        dear.record(4, 8, 6)
    assert dear.size(4, 16) == 0


def test_the_policy_learns_what_a_batch_costs_here():
    policy = DraftPolicy()
    for _ in range(30):
        policy.timed(1, 0.010)
        policy.timed(5, 0.014)  # 4 more tokens for 40% more time
    assert policy.cost == pytest.approx(0.1, abs=0.02)
    fixed = DraftPolicy(cost=0.3)
    fixed.timed(1, 0.01)
    fixed.timed(5, 0.05)
    assert fixed.cost == 0.3


# ---- the real model -------------------------------------------------------------------------

CODE = '''def parse(text):
    values = {}
    for number, line in enumerate(text.splitlines(), start=1):
        key, _, value = line.partition("=")
        if not key.strip():
            raise ValueError(f"line {number}: no key")
        values[key.strip()] = value.strip()
    return values


def dump(values):
    return "\\n".join(f"{key} = {value}" for key, value in values.items())
'''
LIST = "apples, pears, plums, cherries, apricots, peaches, quinces, figs, dates, lemons, limes"
GROUNDED = [
    f"{CODE}\nRename the function parse to parse_config and return the whole file.",
    f"{CODE}\nRepeat the code above exactly.",
    f"Here is a list: {LIST}.\nRepeat the list exactly, then say how many items it has.",
    "The password is 'blue heron 42'. The backup password is 'blue heron 43'. "
    "What are the two passwords? Quote them exactly.",
]
OPEN = [
    "Write a short poem about the sea.",
    "Explain how a bicycle works.",
    "Name three primary colours.",
]
GREEDY = Sampling(temperature=0.0, max_tokens=80)


@contextlib.contextmanager
def drafting_engine(path: Path, **options: Any) -> Iterator[LocalEngine]:
    """An engine whose drafting is forced cheap, so it drafts on any machine: these tests are
    about the text, not the speed."""
    loaded = LocalEngine(EngineOptions(model_path=path, **options), read_model_file(path))
    loaded._policy = DraftPolicy(cost=0.05)
    try:
        yield loaded
    finally:
        loaded.close()


@pytest.fixture(scope="module")
def engine(smollm2_path):
    # One thread: spinning llama.cpp threads on a busy CPU are very slow.
    with drafting_engine(smollm2_path, n_ctx=2048, threads=1) as loaded:
        yield loaded


def reply(engine: LocalEngine, content: str | list[dict[str, str]], sampling: Sampling,
          draft: str, fresh: bool = True):
    messages = [{"role": "user", "content": content}] if isinstance(content, str) else content
    if fresh:
        engine.reset_cache()
    text = "".join(engine.stream(messages, Sampling(**{**vars(sampling), "draft": draft})))
    return text, engine.last_stats


def same_with_and_without_drafts(engine, content, sampling=GREEDY):
    plain, plain_stats = reply(engine, content, sampling, "off")
    drafted, stats = reply(engine, content, sampling, "ngram")
    assert drafted == plain, (content[:40], plain, drafted)
    assert (stats.completion_tokens, stats.finish_reason) == \
        (plain_stats.completion_tokens, plain_stats.finish_reason)
    assert plain_stats.draft_tokens == 0
    assert kv_cells(engine) == engine._llama.n_tokens  # no rejected draft left in the cache
    return plain, stats


def kv_cells(engine: LocalEngine) -> int:
    """Positions sequence 0 holds in llama.cpp's KV cache (its highest position + 1)."""
    llama_cpp = engine._llama_cpp
    return llama_cpp.llama_memory_seq_pos_max(engine._llama._ctx.memory, 0) + 1


@pytest.mark.slow
def test_greedy_replies_are_the_same_with_and_without_drafts(engine):
    drafted = accepted = rejected_steps = 0
    for content in GROUNDED + OPEN:
        _, stats = same_with_and_without_drafts(engine, content)
        drafted += stats.draft_tokens
        accepted += stats.draft_accepted
        rejected_steps += stats.draft_steps - (stats.draft_accepted > 0)
    assert accepted > 50  # grounded replies really were drafted...
    assert accepted < drafted  # ...and some drafts were rejected, and rolled back


@pytest.mark.slow
def test_a_max_tokens_limit_inside_an_accepted_draft_ends_in_the_same_place(engine):
    _, whole = reply(engine, GROUNDED[1], GREEDY, "off")  # where the reply ends by itself
    accepted = 0
    for max_tokens in sorted({1, 2, 5, 9, 13, 17, 22, whole.completion_tokens - 1} - {0}):
        text, stats = same_with_and_without_drafts(
            engine, GROUNDED[1], Sampling(temperature=0.0, max_tokens=max_tokens))
        assert stats.completion_tokens == max_tokens and stats.finish_reason == "length"
        accepted += stats.draft_accepted
    assert accepted > 0


@pytest.mark.slow
def test_stops_and_the_end_of_the_turn_come_at_the_same_token(engine):
    for stop in ("values", "number", ")\n", "=\")"):
        text, stats = same_with_and_without_drafts(
            engine, GROUNDED[1], Sampling(temperature=0.0, max_tokens=120, stop=(stop,)))
        assert stop not in text
    _, stats = same_with_and_without_drafts(engine, GROUNDED[3],
                                            Sampling(temperature=0.0, max_tokens=200))
    assert stats.finish_reason == "stop"  # the model ended its turn, drafts or not
    _, stats = same_with_and_without_drafts(
        engine, GROUNDED[3], Sampling(temperature=0.0, max_tokens=60, ignore_eos=True))
    assert stats.completion_tokens == 60


@pytest.mark.slow
def test_sampling_with_a_seed_gives_the_same_reply_with_and_without_drafts(engine):
    # Each position is sampled by the same chain from the same logits, with the same random
    # draws; a drafted token is kept only when the sampled one equals it.
    for seed in (1, 2, 3):
        same_with_and_without_drafts(engine, GROUNDED[1],
                                     Sampling(temperature=0.7, seed=seed, max_tokens=60))
    # penalties keep state in the chain: only accepted tokens may reach it
    same_with_and_without_drafts(engine, GROUNDED[2], Sampling(
        temperature=0.0, repeat_penalty=1.3, frequency_penalty=0.5, max_tokens=60))


@pytest.mark.slow
def test_a_drafted_token_the_grammar_rejects_is_rejected(engine):
    from localchat.engine.grammar import OutputGrammar, json_grammar

    no_e = OutputGrammar("gbnf", "root ::= [^eE]+", "no letter e")
    text, stats = same_with_and_without_drafts(engine, GROUNDED[1], Sampling(
        temperature=0.0, max_tokens=60, grammar=no_e))
    assert "e" not in text.lower()
    assert stats.draft_tokens > stats.draft_accepted  # drafts of the code, with its e's, refused
    text, stats = same_with_and_without_drafts(engine, GROUNDED[2], Sampling(
        temperature=0.0, max_tokens=60, grammar=json_grammar()))
    assert text.lstrip().startswith("{")


@pytest.mark.slow
def test_a_chat_after_rejected_drafts_reuses_exactly_the_cache_of_the_accepted_tokens(engine):
    def chat(draft):
        engine.reset_cache()
        first = [{"role": "user", "content": GROUNDED[0]}]
        answer, one = reply(engine, first, GREEDY, draft, fresh=False)
        tokens_after_one = engine._llama.input_ids[: engine._llama.n_tokens].tolist()
        cells = kv_cells(engine)
        second = [*first, {"role": "assistant", "content": answer},
                  {"role": "user", "content": "Now rename dump to dump_config, same way."}]
        again, two = reply(engine, second, GREEDY, draft, fresh=False)
        return answer, one, tokens_after_one, cells, again, two

    plain = chat("off")
    drafted = chat("ngram")
    assert drafted[1].draft_tokens > drafted[1].draft_accepted > 0  # turn one had rejections
    assert drafted[2] == plain[2]  # the same tokens recorded as cached...
    assert drafted[3] == plain[3] == len(plain[2])  # ...and exactly those cells in the KV cache
    assert drafted[5].cached_tokens == plain[5].cached_tokens > 0  # turn two reuses as much
    assert (drafted[0], drafted[4]) == (plain[0], plain[4])


@pytest.mark.slow
def test_the_context_window_ends_a_drafted_reply_where_it_ends_a_plain_one(smollm2_path):
    with drafting_engine(smollm2_path, n_ctx=160, threads=1) as small:
        content = CODE[:300] + "\nRepeat the code above exactly, twice."
        text, stats = same_with_and_without_drafts(
            small, content, Sampling(temperature=0.0, ignore_eos=True))
        assert stats.finish_reason == "context"
        assert small._llama.n_tokens == small.n_ctx - 1


@pytest.mark.slow
def test_stats_and_json_report_drafting(engine, smollm2_path):
    from localchat.render import format_stats, stats_record

    _, stats = reply(engine, GROUNDED[1], GREEDY, "ngram")
    assert 0 < stats.draft_acceptance <= 1
    assert stats.tokens_per_verify_step > 1
    record = stats_record("x", engine.info, stats, "m")
    assert record["draft_tokens"] == stats.draft_tokens > 0
    assert record["draft_acceptance"] == round(stats.draft_acceptance, 3)
    assert "drafts " in format_stats(engine.info, stats)
    _, plain = reply(engine, GROUNDED[1], GREEDY, "off")
    assert "drafts" not in format_stats(engine.info, plain)
    assert stats_record("x", engine.info, plain, "m")["draft_acceptance"] is None


def test_every_draft_mode_is_a_setting_choice():
    from localchat import settings

    assert settings.get("draft").choices == settings.DRAFT_MODES == ("auto", "ngram", "off")
    assert settings.get("draft").default == "auto"
    assert Path(speculative.__file__).name == "speculative.py"


@pytest.mark.parametrize(("gpu", "threads", "flash_attn", "cache_type", "tries"), [
    (False, 1, True, "f16", True),  # measured
    (False, 2, True, "f16", False),  # one token's attention split across threads
    (False, 2, True, "q8_0", True),  # no split for a quantized cache: measured
    (False, 1, False, "f16", False),  # without flash attention a batch's kernel
    (True, 2, True, "f16", True),  # GPU kernels: measured
])
def test_auto_does_not_try_where_drafts_are_known_to_change_the_text(
        gpu, threads, flash_attn, cache_type, tries):
    reason = speculative.inexact_reason(gpu, threads, flash_attn, cache_type)
    assert (reason is None) == tries
    assert reason is None or "llama.cpp" in reason


def test_a_batch_shape_is_its_size_and_the_power_of_two_of_its_start():
    shape = speculative.BatchCheck.shape
    assert shape(5, 300) == shape(5, 500) != shape(5, 512) == shape(5, 1023)
    assert shape(4, 300) != shape(5, 300)


@pytest.mark.parametrize(("mode", "inexact", "drafting"), [
    ("auto", None, True), ("auto", "why", False), ("ngram", None, True), ("ngram", "why", True),
    ("off", None, False), ("off", "why", False)])
def test_which_modes_draft(mode, inexact, drafting):
    assert speculative.drafts(mode, inexact) is drafting


def grounded_file_prompt() -> str:
    """The rename workload: about 1,900 tokens, so attention runs over 2,048 cells (ggml splits
    one token's attention across threads from 512)."""
    from localchat.bench_tasks import tasks

    return next(task for task in tasks("grounded") if task.name == "rename").message()


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_auto_drafts_a_long_file_on_one_thread_and_keeps_the_text(smollm2_path, threads):
    with drafting_engine(smollm2_path, n_ctx=2560, threads=threads) as loaded:
        sampling = Sampling(temperature=0.0, max_tokens=96)
        plain, plain_stats = reply(loaded, grounded_file_prompt(), sampling, "off")
        assert plain_stats.prompt_tokens > 1024
        # fresh: a reused prompt's last token is evaluated alone, not in the prompt's batch,
        # and llama.cpp's kernels for a batch of 64 or more round differently
        auto, stats = reply(loaded, grounded_file_prompt(), sampling, "auto")
        assert auto == plain
        if threads == 1:
            assert loaded.info.inexact_drafts is None and stats.draft_accepted > 20
        else:  # auto does not draft here; ngram does (its text may differ)
            assert "2 threads" in (loaded.info.inexact_drafts or "")
            assert stats.draft_tokens == 0
            _, forced = reply(loaded, grounded_file_prompt(), sampling, "ngram")
            assert forced.draft_tokens > 0


def measuring(engine: LocalEngine) -> speculative.BatchCheck:
    """Make `engine`'s auto measure batch shapes from scratch, even where a rule says drafts
    would change the text (to see the measurement find it)."""
    engine.info = replace(engine.info, inexact_drafts=None)
    engine._batch_check = speculative.BatchCheck()
    return engine._batch_check


@pytest.mark.slow
def test_auto_measures_each_batch_shape_then_keeps_drafts_where_they_match(engine):
    before = engine.info
    check = measuring(engine)  # one thread, SmolLM2's Q4_1: a batch matches tokens alone
    try:
        accepted = 0
        for content in GROUNDED[:2]:
            plain, _ = reply(engine, content, GREEDY, "off")
            auto, stats = reply(engine, content, GREEDY, "auto")
            assert auto == plain
            assert kv_cells(engine) == engine._llama.n_tokens
            accepted += stats.draft_accepted
        assert check.failed is None and check.matched and accepted > 20
    finally:
        engine.info, engine._batch_check = before, speculative.BatchCheck()


@pytest.mark.slow
def test_a_batch_that_rounds_otherwise_stops_auto_before_it_keeps_a_draft(smollm2_path):
    # Two threads and an f16 cache over 1,900 tokens: llama.cpp splits one token's attention
    # across the threads, never a batch's, so the logits differ in their last bits.
    with drafting_engine(smollm2_path, n_ctx=2560, threads=2) as loaded:
        check = measuring(loaded)
        sampling = Sampling(temperature=0.0, max_tokens=64)
        plain, _ = reply(loaded, grounded_file_prompt(), sampling, "off")
        auto, stats = reply(loaded, grounded_file_prompt(), sampling, "auto")
        assert auto == plain
        assert (check.failed or "").startswith("measured: llama.cpp gave tokens other logits")
        assert stats.draft_accepted == 0 and not check.matched
        assert kv_cells(loaded) == loaded._llama.n_tokens  # the batch's cells are gone
        assert loaded.info.inexact_drafts == check.failed  # /show and --verbose say it
        _, again = reply(loaded, grounded_file_prompt(), sampling, "auto")
        assert again.draft_tokens == 0


@pytest.mark.slow
def test_auto_with_two_threads_and_a_quantized_cache_measures_and_keeps_the_text(smollm2_path):
    with drafting_engine(smollm2_path, n_ctx=2560, threads=2, cache_type="q8_0") as loaded:
        assert loaded.info.inexact_drafts is None
        sampling = Sampling(temperature=0.0, max_tokens=64)
        plain, _ = reply(loaded, grounded_file_prompt(), sampling, "off")
        auto, stats = reply(loaded, grounded_file_prompt(), sampling, "auto")
        assert auto == plain
        check = loaded._batch_check
        # Which way the measurement goes is this CPU's kernels' business; either way it
        # decided before any draft was kept, and the text is the same.
        assert (check.matched and stats.draft_accepted > 0) or \
            (check.failed and stats.draft_accepted == 0)


@pytest.mark.slow
def test_verbose_says_when_auto_does_not_draft_and_when_ngram_may_change_the_text(smollm2_path):
    from cli_runner import run_cli

    common = ("run", str(smollm2_path), "Hi", "-n", "4", "--threads", "2", "--verbose",
              "--no-history")
    auto = run_cli(*common)
    assert auto.exit_code == 0, auto.stderr
    assert "drafts off (--draft auto): with 2 threads and an f16 KV cache, llama.cpp divides" \
        in auto.stderr
    forced = run_cli(*common, "--draft", "ngram")
    assert "the text may differ from --draft off" in forced.stderr
    one = run_cli(*common[:-3], "1", "--verbose", "--no-history")
    assert one.exit_code == 0, one.stderr
    assert "drafts off" not in one.stderr and "may differ" not in one.stderr


@pytest.mark.slow
def test_verbose_says_when_a_measurement_stopped_auto(smollm2_path, monkeypatch):
    from cli_runner import run_cli

    # Past the rule that knows two threads and an f16 cache round differently: the
    # measurement finds it.
    monkeypatch.setattr(speculative, "inexact_reason", lambda *_args: None)
    monkeypatch.setattr(speculative, "PRIOR_COST", 0.05)  # drafts from the first match
    result = run_cli("run", str(smollm2_path), grounded_file_prompt(), "-n", "40", "--threads",
                     "2", "--ctx", "2560", "--temperature", "0", "--verbose", "--no-history")
    assert result.exit_code == 0, result.stderr
    assert "drafts stopped (--draft auto): measured: llama.cpp gave tokens other logits" \
        in result.stderr
