"""rtllm against Hugging Face transformers on tiny random-weight checkpoints.

Each architecture rtllm supports (Llama with GQA/MHA, tied/untied embeddings,
biases and Llama 3 rope scaling; Mistral with and without an effective sliding
window; Qwen2 with q/k/v biases; Qwen3 with q/k norm and a head_dim other than
hidden/heads) is built with transformers from a seeded config, saved as
safetensors, and loaded by rtllm. Then:

* greedy tokens of ``LLM.generate`` equal ``model.generate(do_sample=False)`` run
  on each prompt alone, for prompts submitted together and for requests that
  arrive while others are mid-generation, and under small batch/token budgets
  with and without chunked prefill;
* the runner's last-position logits match ``model(input_ids).logits[:, -1]``
  within 1e-4 (float32), for one prompt, a packed batch, chunked context and a
  decode step over cached context;
* the KV block size (1, 8, 16, 32 tokens) does not change the tokens;
* a transformers-4 ``config.json`` layout (top-level ``rope_theta``/``rope_scaling``)
  loads to the same logits.

Random weights use a large init std and random norm weights/biases so greedy
outputs are varied and every feature under test changes the result.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from rtllm import LLM, KvCacheConfig, LlmArgs, SamplingParams  # noqa: E402
from rtllm.engine.llm_request import LlmRequest, SamplingConfig  # noqa: E402
from rtllm.engine.scheduler import ScheduledRequest  # noqa: E402
from rtllm.llmapi.build import build_engine  # noqa: E402

MAX_NEW_TOKENS = 40
PROMPT_LENGTHS = (
    1,
    7,
    16,
    17,
    33,
)  # block boundaries of 8/16/32-token blocks, and a 1-token prompt
LOGITS_ATOL = 1e-4
GATE_TIMEOUT_S = 60.0

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "max_position_embeddings": 512,
    "initializer_range": 0.2,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


@dataclass(frozen=True)
class ArchSpec:
    config_cls: str
    model_cls: str
    seed: int
    kwargs: dict[str, Any]
    # Expected fields of rtllm's ModelConfig: proves the feature under test is active.
    expect: dict[str, Any] = field(default_factory=dict)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # head_dim 16, theta 5e5: wavelengths ~6, ~32, ~167, ... fall in all three bands.
    "original_max_position_embeddings": 64,
}

ARCHS: dict[str, ArchSpec] = {
    "llama_gqa": ArchSpec(
        "LlamaConfig",
        "LlamaForCausalLM",
        1,
        {
            "vocab_size": 384,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": False,
        },
        {"num_key_value_heads": 2, "tie_word_embeddings": False},
    ),
    "llama_mha_tied": ArchSpec(
        "LlamaConfig",
        "LlamaForCausalLM",
        2,
        {
            "vocab_size": 256,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
        },
        {"num_key_value_heads": 4, "tie_word_embeddings": True},
    ),
    "llama3_rope": ArchSpec(
        "LlamaConfig",
        "LlamaForCausalLM",
        3,
        {
            "vocab_size": 512,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_theta": 500000.0,
            "rope_scaling": dict(LLAMA3_ROPE),
        },
        {"rope_theta": 500000.0},
    ),
    "llama_bias": ArchSpec(
        "LlamaConfig",
        "LlamaForCausalLM",
        4,
        {
            "vocab_size": 320,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "attention_bias": True,
            "mlp_bias": True,
        },
        {"attention_bias": True, "attention_output_bias": True, "mlp_bias": True},
    ),
    "mistral": ArchSpec(
        "MistralConfig",
        "MistralForCausalLM",
        5,
        {
            "vocab_size": 384,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "sliding_window": None,
        },
        {"sliding_window": None},
    ),
    "mistral_sliding": ArchSpec(
        "MistralConfig",
        "MistralForCausalLM",
        6,
        # Shorter than the longest prompt + output, so the window really cuts keys off.
        {
            "vocab_size": 384,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "sliding_window": 24,
        },
        {"sliding_window": 24},
    ),
    "qwen2": ArchSpec(
        "Qwen2Config",
        "Qwen2ForCausalLM",
        7,
        {
            "vocab_size": 448,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
        {"attention_bias": True, "attention_output_bias": False, "tie_word_embeddings": True},
    ),
    "qwen3": ArchSpec(
        "Qwen3Config",
        "Qwen3ForCausalLM",
        8,
        {"vocab_size": 400, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32},
        {"qk_norm": True, "head_dim": 32},
    ),
}


class HfModel:
    """One saved tiny checkpoint with its transformers model and cached references."""

    def __init__(self, name: str, spec: ArchSpec, path: str) -> None:
        self.name = name
        self.spec = spec
        self.path = path
        torch.manual_seed(spec.seed)
        config = getattr(transformers, spec.config_cls)(**_COMMON, **spec.kwargs)
        model = getattr(transformers, spec.model_cls)(config).eval()
        _randomize_norms_and_biases(model, spec.seed)
        model.save_pretrained(path, safe_serialization=True)
        model.generation_config.eos_token_id = None  # ignore EOS, like ignore_eos=True
        self.model = model
        self.vocab_size = config.vocab_size
        generator = torch.Generator().manual_seed(1000 + spec.seed)
        # Token 1 is EOS: prompts may contain it (the engine must not care).
        self.prompts = [
            torch.randint(1, self.vocab_size, (n,), generator=generator).tolist()
            for n in PROMPT_LENGTHS
        ]
        self._greedy: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def greedy(self, prompt: list[int], max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
        """``model.generate`` on ``prompt`` alone (batch 1, no padding), new tokens only."""
        key = (tuple(prompt), max_new_tokens)
        if key not in self._greedy:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=0,
                    eos_token_id=None,
                    pad_token_id=0,
                )
            new = out[0, len(prompt) :].tolist()
            assert len(new) == max_new_tokens, "reference stopped early"
            self._greedy[key] = new
        return self._greedy[key]

    def last_logits(self, prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return self.model(torch.tensor([prompt])).logits[0, -1].float()


def _randomize_norms_and_biases(model: torch.nn.Module, seed: int) -> None:
    """HF initialises norm weights to 1 and biases to 0; make them matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(torch.empty(param.shape).uniform_(0.5, 1.5, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls on a shared 2-core box are much faster single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], HfModel]:
    """Builds (once per module) and returns the tiny checkpoint called ``name``."""
    cache: dict[str, HfModel] = {}

    def get(name: str) -> HfModel:
        if name not in cache:
            path = tmp_path_factory.mktemp(f"hf_{name}")
            cache[name] = HfModel(name, ARCHS[name], str(path))
        return cache[name]

    return get


def _make_llm(path: str, tokens_per_block: int = 8, **kwargs: Any) -> LLM:
    kwargs.setdefault("max_batch_size", 8)
    kwargs.setdefault("max_num_tokens", 256)
    return LLM(
        model=path,
        skip_tokenizer_init=True,
        kv_cache_config=KvCacheConfig(tokens_per_block=tokens_per_block, max_tokens=8192),
        dtype="float32",
        **kwargs,
    )


def _greedy_params(max_tokens: int = MAX_NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


class StepHook:
    """Wraps ``engine.runner.execute``: records each step's batch and can hold the
    engine thread at a step until the test releases it (deterministic arrivals)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.steps: list[list[tuple[int, int, int, int]]] = []  # (id, computed, new, prompt_len)
        self._gates: list[tuple[Callable[[list[ScheduledRequest]], bool], threading.Event]] = []
        self.gate_hits: list[bool] = []
        self._execute = engine.runner.execute
        engine.runner.execute = self._wrapped

    def hold_when(self, predicate: Callable[[list[ScheduledRequest]], bool]) -> threading.Event:
        """Hold the step for which ``predicate(scheduled)`` is first true until the
        returned event is set."""
        event = threading.Event()
        self._gates.append((predicate, event))
        self.gate_hits.append(False)
        return event

    def release_all(self) -> None:
        for _, event in self._gates:
            event.set()

    def _wrapped(self, scheduled: list[ScheduledRequest], *args: Any) -> torch.Tensor:
        for i, (predicate, event) in enumerate(self._gates):
            if not event.is_set() and not self.gate_hits[i] and predicate(scheduled):
                self.gate_hits[i] = True
                event.wait(GATE_TIMEOUT_S)
        self.steps.append(
            [
                (
                    s.request.request_id,
                    s.request.num_computed_tokens,
                    s.num_new_tokens,
                    s.request.num_prompt_tokens,
                )
                for s in scheduled
            ]
        )
        return self._execute(scheduled, *args)


def _computed_at_least(
    prompt: list[int], num_tokens: int
) -> Callable[[list[ScheduledRequest]], bool]:
    """True for the step in which the request with ``prompt`` has ``num_tokens`` computed."""

    def predicate(scheduled: list[ScheduledRequest]) -> bool:
        return any(
            s.request.prompt_token_ids == prompt and s.request.num_computed_tokens >= num_tokens
            for s in scheduled
        )

    return predicate


def _take_stream(result: Any, num_tokens: int) -> None:
    for out in result:
        if len(out.outputs[0].token_ids) >= num_tokens or out.finished:
            break


def _assert_same_tokens(hf: HfModel, prompt: list[int], got: list[int], label: str) -> None:
    want = hf.greedy(prompt)
    assert got == want, (
        f"{hf.name} {label}: prompt of {len(prompt)} tokens\n  rtllm {got}\n  hf    {want}"
    )


# ----------------------------------------------------------------------- references
@pytest.mark.parametrize("name", list(ARCHS))
def test_reference_is_not_degenerate(hf_models: Callable[[str], HfModel], name: str) -> None:
    hf = hf_models(name)
    for prompt in hf.prompts:
        tokens = hf.greedy(prompt)
        assert len(set(tokens)) >= 8, (
            f"{name}: reference output too repetitive to be a test: {tokens}"
        )
    # Different prompts lead to different outputs.
    assert len({tuple(hf.greedy(p)) for p in hf.prompts}) == len(hf.prompts)


# ------------------------------------------------------------------ greedy generation
@pytest.mark.parametrize("name", list(ARCHS))
def test_generate_batch_matches_hf(hf_models: Callable[[str], HfModel], name: str) -> None:
    hf = hf_models(name)
    # The holds below count committed tokens step by step, which is the synchronous
    # loop's timing; overlap is checked against the synchronous loop in test_overlap.py.
    with _make_llm(hf.path, disable_overlap_scheduler=True) as llm:
        hook = StepHook(llm.executor.engine)
        results = llm.generate(hf.prompts, _greedy_params(), use_tqdm=False)
    assert len(results) == len(hf.prompts)
    for prompt, result in zip(hf.prompts, results, strict=True):
        assert result.outputs[0].finish_reason == "length"
        _assert_same_tokens(hf, prompt, result.outputs[0].token_ids, "batch")
    assert max(len(step) for step in hook.steps) >= 2, "the prompts never shared a step"


@pytest.mark.parametrize("name", list(ARCHS))
def test_generate_inflight_arrivals_match_hf(
    hf_models: Callable[[str], HfModel], name: str
) -> None:
    hf = hf_models(name)
    p1, p7, p16, p17, p33 = hf.prompts
    # The holds below count committed tokens step by step, which is the synchronous
    # loop's timing; overlap is checked against the synchronous loop in test_overlap.py.
    with _make_llm(hf.path, disable_overlap_scheduler=True) as llm:
        hook = StepHook(llm.executor.engine)
        # Hold the engine once `first` has 3 output tokens (prompt + 2 computed), and
        # once the first of wave 1 has 2 output tokens; prompts identify requests.
        release1 = hook.hold_when(_computed_at_least(p33, len(p33) + 2))
        release2 = hook.hold_when(_computed_at_least(p7, len(p7) + 1))
        try:
            first = llm.generate_async(p33, _greedy_params(), streaming=True)
            _take_stream(first, 3)
            assert not first.finished and len(first.outputs[0].token_ids) == 3
            # A first wave arrives while `first` is mid-generation ...
            wave1 = [
                llm.generate_async(p7, _greedy_params(), streaming=True),
                llm.generate_async(p17, _greedy_params()),
            ]
            release1.set()
            # ... and a second wave once the first wave is decoding too.
            _take_stream(wave1[0], 2)
            assert not wave1[0].finished and len(wave1[0].outputs[0].token_ids) == 2
            wave2 = [
                llm.generate_async(p1, _greedy_params()),
                llm.generate_async(p16, _greedy_params()),
            ]
            release2.set()
            for prompt, result in zip(
                [p33, p7, p17, p1, p16], [first, *wave1, *wave2], strict=True
            ):
                result.result(timeout=120)
                _assert_same_tokens(hf, prompt, result.outputs[0].token_ids, "in-flight arrival")
        finally:
            hook.release_all()
    assert hook.gate_hits == [True, True]
    # Some step mixed generation (computed >= prompt) with a context phase (computed < prompt).
    mixed = [
        step
        for step in hook.steps
        if any(c >= p for _, c, _, p in step) and any(c < p for _, c, _, p in step)
    ]
    assert mixed, "no step mixed context and generation requests"


@pytest.mark.parametrize("tokens_per_block", [1, 16, 32])
@pytest.mark.parametrize("name", ["llama_gqa", "mistral_sliding", "qwen3"])
def test_tokens_per_block_does_not_change_tokens(
    hf_models: Callable[[str], HfModel], name: str, tokens_per_block: int
) -> None:
    hf = hf_models(name)
    with _make_llm(hf.path, tokens_per_block=tokens_per_block) as llm:
        assert llm.executor.engine.kv_cache.tokens_per_block == tokens_per_block
        results = llm.generate(hf.prompts, _greedy_params(), use_tqdm=False)
    for prompt, result in zip(hf.prompts, results, strict=True):
        _assert_same_tokens(
            hf, prompt, result.outputs[0].token_ids, f"tokens_per_block={tokens_per_block}"
        )


@pytest.mark.parametrize(
    ("max_batch_size", "max_num_tokens", "chunked"), [(2, 40, False), (4, 12, True)]
)
def test_small_budgets_match_hf(
    hf_models: Callable[[str], HfModel], max_batch_size: int, max_num_tokens: int, chunked: bool
) -> None:
    """Batch-size and token budgets small enough that requests queue, run in changing
    batch compositions and (with chunked prefill) split their prompts across steps."""
    hf = hf_models("llama_gqa")
    with _make_llm(
        hf.path,
        max_batch_size=max_batch_size,
        max_num_tokens=max_num_tokens,
        enable_chunked_prefill=chunked,
    ) as llm:
        hook = StepHook(llm.executor.engine)
        results = llm.generate(hf.prompts, _greedy_params(), use_tqdm=False)
    label = f"max_batch_size={max_batch_size} max_num_tokens={max_num_tokens}"
    for prompt, result in zip(hf.prompts, results, strict=True):
        _assert_same_tokens(hf, prompt, result.outputs[0].token_ids, label)
    assert max(len(step) for step in hook.steps) <= max_batch_size
    assert max(sum(n for _, _, n, _ in step) for step in hook.steps) <= max_num_tokens
    # A context chunk that starts over cached context: chunked prefill happened.
    chunks = [1 for step in hook.steps for _, c, _, p in step if 0 < c < p]
    assert bool(chunks) == chunked


@pytest.mark.parametrize("name", ["llama3_rope", "qwen2", "qwen3"])
def test_transformers_v4_config_layout(
    hf_models: Callable[[str], HfModel], name: str, tmp_path: Path
) -> None:
    """Hub checkpoints written by transformers 4 carry top-level ``rope_theta`` and
    ``rope_scaling`` (no ``rope_parameters``) and ``torch_dtype``: same logits."""
    hf = hf_models(name)
    for file in ("model.safetensors", "config.json"):
        shutil.copy(f"{hf.path}/{file}", tmp_path / file)
    config = json.loads((tmp_path / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    config["torch_dtype"] = config.pop("dtype", "float32")
    (tmp_path / "config.json").write_text(json.dumps(config))
    driver = RunnerDriver(str(tmp_path))
    model_config = driver.built.model_config
    for key, value in hf.spec.expect.items():
        assert getattr(model_config, key) == value, key
    assert (model_config.rope_scaling is not None) == (name == "llama3_rope")
    prompt = hf.prompts[-1]
    logits = driver.execute([(driver.request(prompt), len(prompt))])
    _assert_logits_close(logits[0], hf.last_logits(prompt), f"{name} transformers 4 config")


# ---------------------------------------------------------------------------- logits
class RunnerDriver:
    """Drives an engine's runner directly, step by step, without the scheduler."""

    def __init__(self, path: str, tokens_per_block: int = 8) -> None:
        args = LlmArgs(
            model=path,
            skip_tokenizer_init=True,
            kv_cache_config=KvCacheConfig(tokens_per_block=tokens_per_block, max_tokens=8192),
            dtype="float32",
        )
        self.built = build_engine(args)
        self.engine = self.built.engine
        self._next_id = 0

    def request(self, prompt: list[int]) -> LlmRequest:
        self._next_id += 1
        return LlmRequest(
            self._next_id,
            list(prompt),
            SamplingConfig(max_tokens=8),
            self.engine.limits.max_seq_len,
        )

    def execute(self, work: list[tuple[LlmRequest, int]]) -> torch.Tensor:
        """Compute ``n`` more tokens of each request in one packed step; returns the
        logits of the requests whose step reaches their last token."""
        kv = self.engine.kv_cache
        scheduled = []
        for req, n in work:
            kv.allocate(req, req.num_computed_tokens + n)
            scheduled.append(ScheduledRequest(req, n))
        logits = self.engine.runner.execute(scheduled, kv.block_table)
        for req, n in work:
            req.num_computed_tokens += n
        return logits


def _assert_logits_close(got: torch.Tensor, want: torch.Tensor, label: str) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape, label
    got, want = got.cpu(), want.cpu()
    diff = (got - want).abs().max().item()
    assert diff <= LOGITS_ATOL, (
        f"{label}: max |logit diff| = {diff:.3g} (logits scale {want.abs().max():.3g})"
    )


@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_match_hf(hf_models: Callable[[str], HfModel], name: str) -> None:
    hf = hf_models(name)
    driver = RunnerDriver(hf.path)
    config = driver.built.model_config
    for key, value in hf.spec.expect.items():
        assert getattr(config, key) == value, f"{name}: ModelConfig.{key}={getattr(config, key)!r}"
    if name == "llama3_rope":
        assert config.rope_scaling is not None and config.rope_scaling["rope_type"] == "llama3"

    prompts = hf.prompts
    want = [hf.last_logits(p) for p in prompts]

    # 1. Each prompt alone, whole prompt in one step.
    for prompt, ref in zip(prompts, want, strict=True):
        req = driver.request(prompt)
        logits = driver.execute([(req, len(prompt))])
        assert logits.shape == (1, hf.vocab_size)
        _assert_logits_close(logits[0], ref, f"{name} single prompt len {len(prompt)}")

    # 2. All prompts packed into one step.
    reqs = [driver.request(p) for p in prompts]
    logits = driver.execute([(r, len(p)) for r, p in zip(reqs, prompts, strict=True)])
    assert logits.shape == (len(prompts), hf.vocab_size)
    for i, (prompt, ref) in enumerate(zip(prompts, want, strict=True)):
        _assert_logits_close(logits[i], ref, f"{name} packed batch, prompt len {len(prompt)}")

    # 3. Decode over cached context: prefill all but the last token, then one token.
    long_prompts = [p for p in prompts if len(p) > 1]
    reqs = [driver.request(p) for p in long_prompts]
    empty = driver.execute([(r, len(p) - 1) for r, p in zip(reqs, long_prompts, strict=True)])
    assert empty.shape == (0, hf.vocab_size)  # no request reached its end: nothing sampled
    logits = driver.execute([(r, 1) for r in reqs])
    for i, prompt in enumerate(long_prompts):
        _assert_logits_close(
            logits[i], want[prompts.index(prompt)], f"{name} decode, prompt len {len(prompt)}"
        )


@pytest.mark.parametrize("name", ["llama_gqa", "llama3_rope", "mistral_sliding", "qwen2", "qwen3"])
def test_logits_mixed_step_over_cached_context(
    hf_models: Callable[[str], HfModel], name: str
) -> None:
    """One packed step holding a decode token, a context chunk over cached KV and a
    fresh prompt; then decode steps on generated tokens."""
    hf = hf_models(name)
    driver = RunnerDriver(hf.path)
    _, p7, p16, p17, p33 = hf.prompts
    decode, chunked, fresh, unfinished = (
        driver.request(p17),
        driver.request(p33),
        driver.request(p7),
        driver.request(p16),
    )
    # Step 1: p17 up to its last token; p33's first 10 tokens (mid-block).
    assert driver.execute([(decode, 16), (chunked, 10)]).shape[0] == 0
    # Step 2: one decode token, a 23-token chunk starting mid-block, a fresh prompt,
    # and a chunk that does not reach the end of its prompt (not sampled).
    logits = driver.execute([(decode, 1), (chunked, 23), (fresh, 7), (unfinished, 9)])
    assert logits.shape == (3, hf.vocab_size)
    _assert_logits_close(logits[0], hf.last_logits(p17), f"{name} decode")
    _assert_logits_close(logits[1], hf.last_logits(p33), f"{name} chunk over cached context")
    _assert_logits_close(logits[2], hf.last_logits(p7), f"{name} fresh prompt")
    # Step 3: finish `unfinished`; feed generated (greedy) tokens to the others.
    gen = {r.request_id: [] for r in (decode, chunked, fresh)}
    last = logits
    for _ in range(3):
        work: list[tuple[LlmRequest, int]] = []
        for i, req in enumerate((decode, chunked, fresh)):
            token = int(last[i].argmax())
            req.output_token_ids.append(token)
            gen[req.request_id].append(token)
            work.append((req, 1))
        if unfinished.num_computed_tokens < len(p16):
            work.append((unfinished, len(p16) - unfinished.num_computed_tokens))
        finishing = len(work) == 4
        last = driver.execute(work)
        if finishing:
            _assert_logits_close(last[3], hf.last_logits(p16), f"{name} last chunk of a prompt")
        for i, (req, prompt) in enumerate(
            zip((decode, chunked, fresh), (p17, p33, p7), strict=True)
        ):
            ref = hf.last_logits(prompt + gen[req.request_id])
            _assert_logits_close(last[i], ref, f"{name} generated step {len(gen[req.request_id])}")
    # The greedy tokens fed back are HF's own greedy tokens.
    for req, prompt in zip((decode, chunked, fresh), (p17, p33, p7), strict=True):
        assert gen[req.request_id] == hf.greedy(prompt)[:3]
