"""End-to-end error handling, abort, shutdown and finish reasons on a tiny random Llama.

The model has random weights, so the tests compare the engine against itself
(greedy outputs of undisturbed runs) rather than against fixed token ids.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from rtllm import LLM, KvCacheConfig, RequestError, SamplingParams

VOCAB = 256
MAX_SEQ_LEN = 256
EOS_PROMPT = [5, 6, 7]
TIMEOUT = 60.0


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # OpenMP threads spinning against a busy 2-core machine make steps 10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, int]:
    """A tiny random Llama whose EOS token is one it generates greedily after EOS_PROMPT."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_SEQ_LEN,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([EOS_PROMPT])
    with torch.no_grad():
        for _ in range(3):
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    eos = int(ids[0, len(EOS_PROMPT) + 1])  # the second generated token
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    return str(path), eos


def make_llm(path: str, **kwargs: Any) -> LLM:
    kwargs.setdefault("kv_cache_config", KvCacheConfig(tokens_per_block=8, max_tokens=2048))
    return LLM(model=path, skip_tokenizer_init=True, **kwargs)


@pytest.fixture(scope="module")
def llm(model_dir: tuple[str, int]) -> Iterator[LLM]:
    llm = make_llm(model_dir[0])
    yield llm
    llm.shutdown()


def greedy(max_tokens: int, **kwargs: Any) -> SamplingParams:
    kwargs.setdefault("ignore_eos", True)
    return SamplingParams(max_tokens=max_tokens, **kwargs)


def assert_idle(llm: LLM) -> None:
    """No request left in the engine and every KV block back in the pool."""
    engine = llm.executor.engine
    deadline = time.monotonic() + 10
    while engine.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.requests == {}
    assert not engine.scheduler.has_work
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    assert llm.executor._results == {}


_baselines: dict[tuple[tuple[int, ...], int], list[int]] = {}


def baseline(llm: LLM, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of ``prompt`` run alone, EOS ignored (cached per module run)."""
    key = (tuple(prompt), max_tokens)
    if key not in _baselines:
        out = llm.generate(prompt, greedy(max_tokens))
        assert out.outputs[0].finish_reason == "length"
        _baselines[key] = list(out.outputs[0].token_ids)
    return _baselines[key]


# ---- submit-time validation ---------------------------------------------------------------

TOO_LONG = [i % VOCAB for i in range(MAX_SEQ_LEN + 1)]


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "match"),
    [
        ([], 4, "prompt is empty"),
        ({"prompt_token_ids": []}, 4, "prompt is empty"),
        (TOO_LONG, 1, "more than max_seq_len=256"),
        ([1] * 200, 57, r"exceeds max_seq_len=256; lower max_tokens to at most 56"),
        ([1] * MAX_SEQ_LEN, 1, "exceeds max_seq_len"),
        ([VOCAB], 4, r"prompt token ids must be in \[0, 256\)"),
        ([-1], 4, r"prompt token ids must be in \[0, 256\)"),
        ([5, 1000, 6, -3], 4, r"\[1000, -3\]"),
        ({"prompt_token_ids": [3, 256]}, 4, "must be in"),
        (3.5, 4, "a prompt must be"),
        (None, 4, "a prompt must be"),
        (7, 4, "a prompt must be"),
        ([1.0, 2.0], 4, "a prompt must be"),
        (["a", "b"], 4, "a prompt must be"),  # generate(): a batch of two text prompts
        ([[1, 2]], 4, "a prompt must be"),
        ([True, False], 4, "a prompt must be"),
        ({"tokens": [1, 2]}, 4, "'prompt' or 'prompt_token_ids'"),
        ("some text", 4, "need a tokenizer"),
        ({"prompt": "some text"}, 4, "need a tokenizer"),
    ],
)
def test_submit_time_value_errors(llm: LLM, prompt: Any, max_tokens: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate_async(prompt, SamplingParams(max_tokens=max_tokens))
    # generate() reads a list of non-ints as a batch.
    if prompt == ["a", "b"]:
        match = "need a tokenizer"
    if not isinstance(prompt, float | int | type(None)) and prompt != [[1, 2]]:
        with pytest.raises(ValueError, match=match):
            llm.generate(prompt, SamplingParams(max_tokens=max_tokens))
    assert_idle(llm)


@pytest.mark.parametrize("prompt", [3.5, None, 7])
def test_generate_with_scalar_prompt_raises_value_error(llm: LLM, prompt: Any) -> None:
    try:
        with pytest.raises(ValueError, match="a prompt must be"):
            llm.generate(prompt, SamplingParams(max_tokens=4))
    finally:
        assert_idle(llm)


def test_wrong_sampling_params_type(llm: LLM) -> None:
    with pytest.raises(ValueError, match="sampling_params must be a SamplingParams, got dict"):
        llm.generate_async([1, 2], {"max_tokens": 3})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        llm.generate([[1, 2], [3, 4]], [SamplingParams()])
    assert_idle(llm)


def test_limits_are_inclusive(llm: LLM) -> None:
    out = llm.generate([1] * 200, greedy(56))
    assert out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 56
    out = llm.generate([VOCAB - 1, 0], greedy(1))
    assert len(out.outputs[0].token_ids) == 1
    assert_idle(llm)


def test_engine_limits_from_llm_args(llm: LLM, model_dir: tuple[str, int]) -> None:
    prompt = [(7 * j) % VOCAB for j in range(40)]
    with make_llm(model_dir[0], max_num_tokens=16, max_seq_len=64) as small:
        with pytest.raises(
            ValueError, match=r"more than max_num_tokens=16.*enable_chunked_prefill"
        ):
            small.generate_async(prompt, greedy(4))
        with pytest.raises(ValueError, match="exceeds max_seq_len=64"):
            small.generate_async(prompt[:10], greedy(55))
        assert_idle(small)
    # With chunked prefill the long prompt runs in 16-token chunks, with the same result.
    with make_llm(model_dir[0], max_num_tokens=16, enable_chunked_prefill=True) as chunked:
        out = chunked.generate(prompt, greedy(6))
        assert out.outputs[0].token_ids == baseline(llm, prompt, 6)
        assert_idle(chunked)
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        make_llm(model_dir[0], max_seq_len=MAX_SEQ_LEN + 1)


def test_bad_prompt_in_batch_aborts_the_ones_already_submitted(llm: LLM) -> None:
    with pytest.raises(ValueError, match="must be in"):
        llm.generate([[10, 11], [12, 13], [999]], greedy(200))
    assert_idle(llm)


# ---- finish reasons ---------------------------------------------------------------------


def test_max_tokens_finishes_with_length(llm: LLM) -> None:
    for n in (1, 2, 9):
        out = llm.generate([40, 41, 42], greedy(n))
        assert out.finished
        assert out.outputs[0].finish_reason == "length"
        assert out.outputs[0].stop_reason is None
        assert len(out.outputs[0].token_ids) == n
        assert out.outputs[0].token_ids == baseline(llm, [40, 41, 42], 9)[:n]
    assert_idle(llm)


def test_stop_token_ids_finish_with_stop(llm: LLM) -> None:
    prompt = [50, 51, 52, 53]
    base = baseline(llm, prompt, 16)
    for k in (0, 3, 7):
        token = base[k]
        first = base.index(token)
        out = llm.generate(prompt, greedy(16, stop_token_ids=[token]))
        assert out.outputs[0].finish_reason == "stop"
        assert out.outputs[0].stop_reason == token
        assert out.outputs[0].token_ids == base[: first + 1]
    # A stop token that never comes changes nothing.
    unused = next(t for t in range(VOCAB) if t not in base)
    out = llm.generate(prompt, greedy(16, stop_token_ids=[unused]))
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == base
    assert_idle(llm)


def test_end_id_finishes_with_stop_and_ignore_eos_overrides(llm: LLM) -> None:
    prompt = [60, 61, 62]
    base = baseline(llm, prompt, 16)
    token = base[5]
    first = base.index(token)
    out = llm.generate(prompt, SamplingParams(max_tokens=16, end_id=token))
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == token
    assert out.outputs[0].token_ids == base[: first + 1]
    out = llm.generate(prompt, SamplingParams(max_tokens=16, end_id=token, ignore_eos=True))
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == base
    # ignore_eos does not silence stop_token_ids.
    out = llm.generate(
        prompt, SamplingParams(max_tokens=16, ignore_eos=True, stop_token_ids=[token])
    )
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].token_ids == base[: first + 1]
    assert_idle(llm)


def test_model_eos_is_the_default_end_id(llm: LLM, model_dir: tuple[str, int]) -> None:
    eos = model_dir[1]
    assert llm.executor.default_end_ids == (eos,)
    base = baseline(llm, EOS_PROMPT, 12)
    assert eos in base
    first = base.index(eos)
    out = llm.generate(EOS_PROMPT, SamplingParams(max_tokens=12))
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == eos
    assert out.outputs[0].token_ids == base[: first + 1]
    out = llm.generate(EOS_PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == base
    # An explicit end_id replaces the model's EOS.
    other = next(t for t in range(VOCAB) if t not in base)
    out = llm.generate(EOS_PROMPT, SamplingParams(max_tokens=12, end_id=other))
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids == base
    assert_idle(llm)


def test_batch_of_mixed_finish_reasons(llm: LLM) -> None:
    prompt = [50, 51, 52, 53]
    base = baseline(llm, prompt, 16)
    outs = llm.generate(
        [prompt, prompt, prompt],
        [greedy(16), greedy(16, stop_token_ids=[base[3]]), greedy(3)],
    )
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "stop", "length"]
    assert outs[0].outputs[0].token_ids == base
    assert outs[1].outputs[0].token_ids == base[: base.index(base[3]) + 1]
    assert outs[2].outputs[0].token_ids == base[:3]
    assert_idle(llm)


# ---- abort --------------------------------------------------------------------------------


def test_abort_some_streaming_requests(llm: LLM) -> None:
    n = 200
    prompts = [[70 + i, 71 + i, 72 + i] for i in range(4)]
    results = [llm.generate_async(p, greedy(n), streaming=True) for p in prompts]
    results[1].abort()  # probably before its first token
    seen = 0
    for out in results[2]:
        seen += len(out.outputs[0].token_ids_diff)
        if seen >= 3:
            out.abort()
            out.abort()  # twice is harmless
    for r in results:
        r.result(timeout=TIMEOUT)
    reasons = [r.outputs[0].finish_reason for r in results]
    assert reasons == ["length", "cancelled", "cancelled", "length"]
    assert len(results[0].outputs[0].token_ids) == n
    assert len(results[3].outputs[0].token_ids) == n
    assert 3 <= len(results[2].outputs[0].token_ids) < n
    assert len(results[1].outputs[0].token_ids) < n
    assert all(r.finished for r in results)
    assert all(r.error is None for r in results)
    assert_idle(llm)
    # Aborting a finished request is a no-op that does not touch later requests.
    results[0].abort()
    out = llm.generate(prompts[0], greedy(4))
    assert out.outputs[0].token_ids == results[0].outputs[0].token_ids[:4]
    assert_idle(llm)


def test_aborted_prefix_matches_unaborted_run(llm: LLM) -> None:
    prompt = [90, 91, 92, 93, 94]
    result = llm.generate_async(prompt, greedy(200), streaming=True)
    for out in result:
        if len(out.outputs[0].token_ids) >= 5:
            out.abort()
    got = result.outputs[0].token_ids
    assert result.outputs[0].finish_reason == "cancelled"
    assert got == baseline(llm, prompt, 200)[: len(got)]
    assert_idle(llm)


# ---- a failing request -------------------------------------------------------------------

MARKER = 250


def test_failing_request_does_not_hurt_its_batch(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = llm.executor.engine.runner
    prompts = {"a": [10, 11, 12], "b": [20, 21], "c": [30, 31, 32, 33]}
    n = 8
    expected = {k: baseline(llm, p, n) for k, p in prompts.items()}

    original = runner.execute
    gate, entered = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def execute(scheduled: list[Any], *args: Any) -> torch.Tensor:
        firsts = [item.request.prompt_token_ids[0] for item in scheduled]
        batches.append(firsts)
        if not gate.is_set():
            entered.set()
            gate.wait(TIMEOUT)
        if MARKER in firsts:
            raise RuntimeError("injected fault")
        return original(scheduled, *args)

    monkeypatch.setattr(runner, "execute", execute)
    a = llm.generate_async(prompts["a"], greedy(n))
    assert entered.wait(TIMEOUT)  # the engine is inside a's first step: hold it there
    bad = llm.generate_async([MARKER, 1, 2], greedy(n))
    b = llm.generate_async(prompts["b"], greedy(n))
    c = llm.generate_async(prompts["c"], greedy(n))
    gate.set()

    with pytest.raises(RequestError, match="injected fault") as info:
        bad.result(timeout=TIMEOUT)
    assert f"request {bad.request_id} failed" in str(info.value)
    assert bad.finished
    assert bad.outputs[0].finish_reason == "error"
    assert bad.outputs[0].token_ids == []
    assert bad.error == "RuntimeError: injected fault"
    for key, result in zip("abc", (a, b, c), strict=True):
        result.result(timeout=TIMEOUT)
        assert result.error is None
        assert result.outputs[0].finish_reason == "length"
        assert result.outputs[0].token_ids == expected[key], key
    # The fault hit a shared batch, which was then retried one request at a time.
    shared = [batch for batch in batches if MARKER in batch and len(batch) > 1]
    assert shared, batches
    assert sorted(shared[0]) == sorted([10, MARKER, 20, 30])
    assert [MARKER] in batches
    assert_idle(llm)
    # The engine still serves requests (the patched runner is still in place).
    again = llm.generate(prompts["b"], greedy(n))
    assert again.outputs[0].token_ids == expected["b"]
    # A failing request alone in its step fails alone, too.
    with pytest.raises(RequestError, match="injected fault"):
        llm.generate([MARKER, 3], greedy(n))
    assert_idle(llm)
    monkeypatch.undo()
    assert llm.generate(prompts["a"], greedy(n)).outputs[0].token_ids == expected["a"]


def test_failing_sampler_fails_only_the_request(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = llm.executor.engine.sampler
    original = sampler.sample_async

    def sample(logits: torch.Tensor, requests: list[Any], pending: Any = None) -> Any:
        if any(r.prompt_token_ids[0] == MARKER for r in requests):
            raise ValueError("sampler exploded")
        return original(logits, requests, pending)

    monkeypatch.setattr(sampler, "sample_async", sample)
    outs = [llm.generate_async(p, greedy(6)) for p in ([MARKER, 9], [15, 16], [MARKER, 8])]
    with pytest.raises(RequestError, match="ValueError: sampler exploded"):
        outs[0].result(timeout=TIMEOUT)
    with pytest.raises(RequestError):
        outs[2].result(timeout=TIMEOUT)
    outs[1].result(timeout=TIMEOUT)
    assert outs[1].outputs[0].token_ids == baseline(llm, [15, 16], 6)
    assert_idle(llm)


def test_failing_step_fails_running_requests_and_engine_goes_on(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = llm.executor.engine.scheduler
    original = scheduler.schedule
    calls = {"n": 0}

    def schedule() -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("scheduler broke")
        return original()

    monkeypatch.setattr(scheduler, "schedule", schedule)
    result = llm.generate_async([17, 18, 19], greedy(50))
    with pytest.raises(RequestError, match="scheduler broke"):
        result.result(timeout=TIMEOUT)
    assert result.outputs[0].finish_reason == "error"
    assert 1 <= len(result.outputs[0].token_ids) < 50
    assert_idle(llm)
    got = result.outputs[0].token_ids
    out = llm.generate([17, 18, 19], greedy(len(got) + 2))
    assert out.outputs[0].finish_reason == "length"
    assert out.outputs[0].token_ids[: len(got)] == got
    assert_idle(llm)


# ---- async API -----------------------------------------------------------------------------


def test_async_await_and_streaming(llm: LLM) -> None:
    prompt = [100, 101, 102]
    n = 12
    base = baseline(llm, prompt, n)

    async def main() -> tuple[list[int], list[list[int]], list[int], list[list[int]]]:
        done = await llm.generate_async(prompt, greedy(n))
        diffs: list[list[int]] = []
        final: list[int] = []
        async for out in llm.generate_async(prompt, greedy(n), streaming=True):
            diffs.append(list(out.outputs[0].token_ids_diff))
            final = list(out.outputs[0].token_ids)
            assert final[: sum(len(d) for d in diffs)] == [t for d in diffs for t in d]
        gathered = await asyncio.gather(
            *(llm.generate_async([110 + i, 111], greedy(4 + i)) for i in range(3))
        )
        return (
            list(done.outputs[0].token_ids),
            diffs,
            final,
            [list(g.outputs[0].token_ids) for g in gathered],
        )

    done, diffs, final, gathered = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert done == base
    assert [t for d in diffs for t in d] == final == base
    assert [len(d) for d in diffs] == [1] * n  # one token per step, one delta per token
    for i, tokens in enumerate(gathered):
        assert tokens == baseline(llm, [110 + i, 111], 4 + i)
    assert_idle(llm)


def test_async_abort_while_streaming(llm: LLM) -> None:
    async def main() -> tuple[str | None, int]:
        result = llm.generate_async([120, 121], greedy(200), streaming=True)
        count = 0
        async for out in result:
            count += len(out.outputs[0].token_ids_diff)
            if count == 2:
                out.abort()
        return result.outputs[0].finish_reason, len(result.outputs[0].token_ids)

    reason, count = asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert reason == "cancelled"
    assert 2 <= count < 200
    assert_idle(llm)


def test_async_request_error(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = llm.executor.engine.runner
    original = runner.execute

    def execute(scheduled: list[Any], *args: Any) -> torch.Tensor:
        if any(item.request.prompt_token_ids[0] == MARKER for item in scheduled):
            raise RuntimeError("async fault")
        return original(scheduled, *args)

    monkeypatch.setattr(runner, "execute", execute)

    async def main() -> None:
        with pytest.raises(RequestError, match="async fault"):
            await llm.generate_async([MARKER], greedy(3))
        with pytest.raises(RequestError, match="async fault"):
            async for _ in llm.generate_async([MARKER], greedy(3), streaming=True):
                pass

    asyncio.run(asyncio.wait_for(main(), TIMEOUT))
    assert_idle(llm)


def test_sync_streaming_deltas(llm: LLM) -> None:
    prompt = [130, 131]
    base = baseline(llm, prompt, 7)
    result = llm.generate_async(prompt, greedy(7), streaming=True)
    diffs = [list(out.outputs[0].token_ids_diff) for out in result]
    assert diffs == [[t] for t in base]
    assert result.outputs[0].token_ids == base


# ---- shutdown ------------------------------------------------------------------------------


def test_shutdown_while_requests_run(model_dir: tuple[str, int]) -> None:
    # 256-token pool: one request of 3 + 200 tokens (26 of 32 blocks) at a time.
    llm = make_llm(model_dir[0], kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=256))
    executor = llm.executor
    kv = executor.engine.kv_cache
    results = [llm.generate_async([140 + i, 1, 2], greedy(200), streaming=True) for i in range(3)]
    next(iter(results[0]))  # the first request is running
    assert kv.num_free_blocks < kv.num_blocks
    deadline = time.monotonic() + 10
    while len(executor.engine.scheduler.waiting) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(executor.engine.scheduler.waiting) == 2  # the others wait for blocks

    stopper = threading.Thread(target=llm.shutdown)
    stopper.start()
    stopper.join(TIMEOUT)
    assert not stopper.is_alive(), "shutdown hung"
    assert not executor.is_alive

    for r in results:
        r.result(timeout=10)
        assert r.finished
        assert r.outputs[0].finish_reason == "cancelled"
        assert r.error is None
    assert 1 <= len(results[0].outputs[0].token_ids) < 200
    assert results[1].outputs[0].token_ids == []
    assert results[2].outputs[0].token_ids == []
    assert kv.num_free_blocks == kv.num_blocks
    assert executor.engine.requests == {}

    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate_async([1, 2], greedy(2))
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([1, 2], greedy(2))
    with pytest.raises(RuntimeError, match="shut down"):
        executor.submit(_request([1, 2]))
    llm.shutdown()  # idempotent
    results[0].abort()  # harmless after shutdown


def _request(tokens: list[int]) -> Any:
    from rtllm.executor.request import GenerationRequest

    return GenerationRequest(tokens, greedy(2))


def test_abort_waiting_request(model_dir: tuple[str, int]) -> None:
    with make_llm(
        model_dir[0], kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=256)
    ) as llm:
        kv = llm.executor.engine.kv_cache
        first = llm.generate_async([150, 1], greedy(60))
        waiting = llm.generate_async([151, 1], greedy(200))  # 26 blocks: waits for first
        last = llm.generate_async([152, 1], greedy(5))  # FIFO: waits behind it
        waiting.abort()
        waiting.result(timeout=TIMEOUT)
        assert waiting.outputs[0].finish_reason == "cancelled"
        assert waiting.outputs[0].token_ids == []
        first.result(timeout=TIMEOUT)
        last.result(timeout=TIMEOUT)
        assert first.outputs[0].finish_reason == "length"
        assert len(first.outputs[0].token_ids) == 60
        assert last.outputs[0].finish_reason == "length"
        assert len(last.outputs[0].token_ids) == 5
        assert kv.num_free_blocks == kv.num_blocks
        executor = llm.executor
    assert not executor.is_alive


def test_shutdown_without_requests_and_context_manager(model_dir: tuple[str, int]) -> None:
    with make_llm(model_dir[0]) as llm:
        out = llm.generate([160, 161], greedy(3))
        assert len(out.outputs[0].token_ids) == 3
        executor = llm.executor
    assert not executor.is_alive
    with pytest.raises(RuntimeError, match="shut down"):
        _ = llm.executor


def test_shutdown_leaves_the_engine_collectable(model_dir: tuple[str, int]) -> None:
    """The LLM freezes start-up objects out of the garbage collector's passes; after
    shutdown nothing of it may stay alive (a frozen cycle would hold its weights)."""
    import gc
    import weakref

    llm = make_llm(model_dir[0])
    llm.generate([[5, 6, 7]], greedy(2), use_tqdm=False)
    model = weakref.ref(llm.executor.engine.runner.model)
    llm.shutdown()
    del llm
    gc.collect()
    assert model() is None
    assert gc.get_freeze_count() == 0
