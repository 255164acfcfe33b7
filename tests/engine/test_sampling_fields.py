"""SamplingParams fields end to end on a tiny random Llama, against transformers:
penalties, n-gram bans, min_tokens, bad token ids, logprobs and generation logits."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rtllm import LLM, KvCacheConfig, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9, 5, 6], list(range(30, 52))]
NEW = 20


@pytest.fixture(scope="module")
def hf_and_dir(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("sampling_llama")
    model.save_pretrained(path)
    return model, str(path)


@pytest.fixture(scope="module")
def llm(hf_and_dir):
    with LLM(hf_and_dir[1], skip_tokenizer_init=True, dtype="float32",
             kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=2048)) as llm:
        yield llm


def hf_generate(model, prompt: list[int], **kwargs) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW, **kwargs)
    return out[0, len(prompt):].tolist()


CASES = [
    ({"repetition_penalty": 1.8}, {"repetition_penalty": 1.8}),
    ({"repetition_penalty": 0.7}, {"repetition_penalty": 0.7}),
    ({"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 2}),
    ({"no_repeat_ngram_size": 1}, {"no_repeat_ngram_size": 1}),
    ({"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}),
]


@pytest.mark.parametrize(("ours", "theirs"), CASES, ids=[str(c[0]) for c in CASES])
def test_penalties_match_transformers(llm, hf_and_dir, ours, theirs) -> None:
    model = hf_and_dir[0]
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW, temperature=0, **ours), use_tqdm=False)
    plain = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW, temperature=0), use_tqdm=False)
    changed = False
    for prompt, out, base in zip(PROMPTS, outs, plain, strict=True):
        assert out.outputs[0].token_ids == hf_generate(model, prompt, **theirs)
        changed |= out.outputs[0].token_ids != base.outputs[0].token_ids
    assert changed, "the penalty changed nothing: the test would not see it broken"


def test_bad_token_ids_and_min_tokens_match_transformers(llm, hf_and_dir) -> None:
    model = hf_and_dir[0]
    plain = llm.generate(PROMPTS[1], SamplingParams(max_tokens=NEW, temperature=0)).outputs[0].token_ids
    banned = sorted(set(plain[:4]))
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=NEW, temperature=0, bad_token_ids=banned))
    assert not set(out.outputs[0].token_ids) & set(banned)
    assert out.outputs[0].token_ids == hf_generate(model, PROMPTS[1], bad_words_ids=[[t] for t in banned])
    first_new = next(i for i in range(2, NEW) if plain[i] not in plain[:i])
    eos = plain[first_new]  # would end the request at this token
    early = llm.generate(PROMPTS[1], SamplingParams(max_tokens=NEW, temperature=0, end_id=eos))
    assert len(early.outputs[0].token_ids) == first_new + 1
    late = llm.generate(PROMPTS[1], SamplingParams(max_tokens=NEW, temperature=0, end_id=eos, min_tokens=first_new + 6))
    want = hf_generate(model, PROMPTS[1], eos_token_id=eos, min_new_tokens=first_new + 6)
    assert late.outputs[0].token_ids == want and len(want) >= first_new + 6


def test_presence_and_frequency_penalties_change_only_repeated_tokens(llm) -> None:
    base = llm.generate(PROMPTS[0], SamplingParams(max_tokens=NEW, temperature=0)).outputs[0].token_ids
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=NEW, temperature=0, frequency_penalty=2.0,
                                                  presence_penalty=2.0)).outputs[0].token_ids
    first_repeat = next(i for i, t in enumerate(base) if t in base[:i])
    assert out[:first_repeat] == base[:first_repeat]  # identical until a token would repeat
    assert len(set(out)) > len(set(base))


def test_logprobs_and_generation_logits_match_transformers(llm, hf_and_dir) -> None:
    model = hf_and_dir[0]
    temperature = 0.7
    params = SamplingParams(max_tokens=12, temperature=temperature, seed=3, logprobs=4,
                            return_generation_logits=True, repetition_penalty=1.2)
    out = llm.generate(PROMPTS[1], params).outputs[0]
    sequence = PROMPTS[1] + out.token_ids
    with torch.no_grad():
        raw = model(torch.tensor([sequence])).logits[0, len(PROMPTS[1]) - 1 : -1].float()
    torch.testing.assert_close(out.generation_logits, raw, atol=1e-4, rtol=1e-4)
    from transformers import RepetitionPenaltyLogitsProcessor

    cumulative = 0.0
    for step, (token, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        history = torch.tensor([sequence[: len(PROMPTS[1]) + step]])
        processed = RepetitionPenaltyLogitsProcessor(1.2)(history, raw[step : step + 1].clone())[0]
        reference = torch.log_softmax(processed / temperature, dim=-1)
        assert list(entry)[0] == token
        assert abs(entry[token].logprob - reference[token].item()) < 1e-4
        assert entry[token].rank == int((reference > reference[token]).sum()) + 1
        top = reference.topk(4)
        alternatives = [(t, lp) for t, lp in entry.items()]
        for t, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert abs(entry[t].logprob - lp) < 1e-4
        assert len(alternatives) in (4, 5)
        cumulative += reference[token].item()
    assert abs(out.cumulative_logprob - cumulative) < 1e-3


def test_logits_processor_callable(llm) -> None:
    seen: list[int] = []

    def only_even(token_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        seen.append(len(token_ids))
        logits[1::2] = float("-inf")
        return logits

    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=6, temperature=0, logits_processor=only_even))
    assert all(t % 2 == 0 for t in out.outputs[0].token_ids)
    assert seen == list(range(6))  # called once per step with the tokens so far
    calls: list[tuple[int, int]] = []

    def three_args(prompt_ids: list[int], token_ids: list[int], logits: torch.Tensor) -> None:
        calls.append((len(prompt_ids), len(token_ids)))
        logits[7] = 1e9  # edits in place, returns None

    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, logits_processors=[three_args]))
    assert out.outputs[0].token_ids == [7, 7, 7] and calls == [(7, 0), (7, 1), (7, 2)]


def test_embedding_bias_and_min_p(llm) -> None:
    bias = torch.zeros(128)
    bias[42] = 1e4
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=1.0, seed=1, embedding_bias=bias))
    assert out.outputs[0].token_ids == [42] * 4
    with pytest.raises(ValueError, match="embedding_bias must have the model's vocab_size"):
        llm.generate(PROMPTS[0], SamplingParams(embedding_bias=torch.zeros(7)))
    greedy = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0)).outputs[0].token_ids
    hot = llm.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=5.0, min_p=1.0, seed=2))
    assert hot.outputs[0].token_ids == greedy  # min_p=1 keeps only the likeliest token


def test_same_seed_alone_and_in_a_busy_mixed_batch(llm) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, min_p=0.05, seed=77,
                            repetition_penalty=1.1, logprobs=2)
    alone = llm.generate(PROMPTS[1], params).outputs[0]
    others = [SamplingParams(max_tokens=15, temperature=1.2, top_k=5),
              SamplingParams(max_tokens=12, temperature=0, presence_penalty=1.0),
              SamplingParams(max_tokens=9, temperature=0.5, seed=5, no_repeat_ngram_size=2)]
    batch = llm.generate([PROMPTS[0], PROMPTS[1], [9, 9, 9], PROMPTS[1]], [others[0], params, others[1], others[2]],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone.token_ids
    assert [list(e)[0] for e in batch[1].outputs[0].logprobs] == alone.token_ids


def test_bad_words_need_a_tokenizer(llm) -> None:
    with pytest.raises(ValueError, match="bad words need a tokenizer"):
        llm.generate(PROMPTS[0], SamplingParams(bad=["hello"]))


def test_prompt_logprobs_and_context_logits_match_transformers(hf_and_dir) -> None:
    model, path = hf_and_dir
    prompt = PROMPTS[1]
    with torch.no_grad():
        raw = model(torch.tensor([prompt])).logits[0].float()
    reference = torch.log_softmax(raw, dim=-1)
    # Chunked over several steps, and with a cached prefix that must not be reused.
    with LLM(path, skip_tokenizer_init=True, dtype="float32", enable_chunked_prefill=True, max_num_tokens=8,
             kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=2048)) as llm:
        llm.generate(prompt, SamplingParams(max_tokens=2))
        out = llm.generate(prompt, SamplingParams(max_tokens=2, prompt_logprobs=3, return_context_logits=True))
    torch.testing.assert_close(out.context_logits, raw, atol=1e-4, rtol=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        entry = out.prompt_logprobs[position]
        token = prompt[position]
        assert list(entry)[0] == token
        assert abs(entry[token].logprob - reference[position - 1, token].item()) < 1e-4
        assert entry[token].rank == int((reference[position - 1] > reference[position - 1, token]).sum()) + 1
        top = reference[position - 1].topk(3)
        for t, lp in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            assert abs(entry[t].logprob - lp) < 1e-4


def test_truncate_prompt_and_include_input(llm) -> None:
    full = llm.generate(PROMPTS[1][-5:], SamplingParams(max_tokens=4, temperature=0))
    cut = llm.generate(PROMPTS[1], SamplingParams(max_tokens=4, temperature=0, truncate_prompt_tokens=5))
    assert cut.prompt_token_ids == PROMPTS[1][-5:]
    assert cut.outputs[0].token_ids == full.outputs[0].token_ids
    both = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0, exclude_input_from_output=False))
    alone = llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, temperature=0))
    assert both.outputs[0].token_ids == PROMPTS[0] + alone.outputs[0].token_ids


def test_penalties_under_the_overlap_loop_match_the_synchronous_loop(hf_and_dir) -> None:
    params = [SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.5, frequency_penalty=0.7,
                             presence_penalty=0.3, no_repeat_ngram_size=3),
              SamplingParams(max_tokens=16, temperature=0.9, seed=4, repetition_penalty=1.3)]
    results = []
    for overlap in (False, True):
        with LLM(hf_and_dir[1], skip_tokenizer_init=True, dtype="float32", disable_overlap_scheduler=not overlap,
                 kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=2048)) as llm:
            outs = llm.generate(PROMPTS, params, use_tqdm=False)
            results.append([o.outputs[0].token_ids for o in outs])
    assert results[0] == results[1]


def test_pending_tokens_are_patched_on_the_device() -> None:
    from rtllm.engine.logits_processors import LogitsParams, PendingTokens, process_logits

    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [LogitsParams(repetition_penalty=1.7, presence_penalty=0.5, frequency_penalty=0.4,
                           no_repeat_ngram_size=2)] * 3
    prompts = [[1, 2, 3], [4, 5], [6]]
    outputs = [[7, 8, 9], [10, 11], [12, 6]]
    want = process_logits(logits.clone(), params, prompts, outputs)
    placeholders = [o[:-1] + [-1] for o in outputs]
    pending = PendingTokens([0, 2], torch.tensor([9, 6]))
    got = process_logits(logits.clone(), params, prompts, [placeholders[0], outputs[1], placeholders[2]], pending)
    torch.testing.assert_close(got, want)
