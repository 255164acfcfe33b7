"""Beam search against transformers' generate(num_beams=...): same sequences, same
order, scores equal to transformers' sequences_scores; beams share KV blocks."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rtllm import LLM, KvCacheConfig, SamplingParams

EOS = 3
PROMPTS = [list(range(5, 20)), [7, 8, 9, 10], list(range(30, 61))]


@pytest.fixture(scope="module")
def hf_and_llm(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=EOS, bos_token_id=None, pad_token_id=None, initializer_range=0.3)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("beam_llama")
    model.save_pretrained(path)
    with LLM(str(path), skip_tokenizer_init=True, max_beam_width=4,
             kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=2048)) as llm:
        yield model, llm


def reference(model, prompt: list[int], beams: int, n: int, new: int, length_penalty: float, early_stopping):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), num_beams=beams, num_return_sequences=n, max_new_tokens=new,
                             do_sample=False, length_penalty=length_penalty, early_stopping=early_stopping,
                             output_scores=True, return_dict_in_generate=True)
    sequences = []
    for row in out.sequences:
        tokens = row[len(prompt):].tolist()
        if EOS in tokens:  # transformers pads a finished beam with EOS
            tokens = tokens[: tokens.index(EOS) + 1]
        sequences.append(tokens)
    return sequences, out.sequences_scores.tolist()


CASES = [(4, 2, 12, 1.0, True, 1), (4, 2, 12, 0.5, False, 0), (4, 2, 12, 2.0, "never", 2),
         (3, 3, 9, 1.0, False, 0), (2, 1, 16, -0.5, True, 1)]


@pytest.mark.parametrize(("beams", "n", "new", "length_penalty", "hf_stop", "our_stop"), CASES)
def test_beam_search_matches_transformers(hf_and_llm, beams, n, new, length_penalty, hf_stop, our_stop) -> None:
    model, llm = hf_and_llm
    params = SamplingParams(max_tokens=new, use_beam_search=True, best_of=beams, n=n,
                            length_penalty=length_penalty, early_stopping=our_stop)
    outs = llm.generate(PROMPTS, [params] * len(PROMPTS), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs, strict=True):
        sequences, scores = reference(model, prompt, beams, n, new, length_penalty, hf_stop)
        assert [o.token_ids for o in out.outputs] == sequences
        for output, score in zip(out.outputs, scores, strict=True):
            normalised = output.cumulative_logprob / (len(output.token_ids) ** length_penalty)
            assert abs(normalised - score) < 1e-4
            assert output.finish_reason == ("stop" if output.token_ids[-1] == EOS else "length")
    kv = llm.executor.engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks and not llm.executor.engine.groups


def test_beam_search_next_to_other_requests(hf_and_llm) -> None:
    model, llm = hf_and_llm
    beam = SamplingParams(max_tokens=10, use_beam_search=True, best_of=4, n=2)
    plain = SamplingParams(max_tokens=10, temperature=0)
    outs = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [beam, plain, beam], use_tqdm=False)
    assert [o.token_ids for o in outs[0].outputs] == reference(model, PROMPTS[0], 4, 2, 10, 1.0, True)[0]
    assert [o.token_ids for o in outs[2].outputs] == reference(model, PROMPTS[2], 4, 2, 10, 1.0, True)[0]
    alone = llm.generate(PROMPTS[1], plain)
    assert outs[1].outputs[0].token_ids == alone.outputs[0].token_ids


def test_beams_share_blocks(hf_and_llm) -> None:
    _, llm = hf_and_llm
    engine = llm.executor.engine
    seen: list[int] = []
    original = engine.runner.execute

    def spy(scheduled, block_table_of, *args, **kwargs):
        tables = [block_table_of(item.request.request_id) for item in scheduled]
        if len(tables) == 4:
            seen.append(len({b for t in tables for b in t}))
        return original(scheduled, block_table_of, *args, **kwargs)

    engine.runner.execute = spy
    llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, use_beam_search=True, best_of=4))
    del engine.runner.execute
    # 31 prompt tokens + up to 8 generated in blocks of 8: 4 unshared tables would hold 4 x 5.
    assert seen and max(seen) < 4 * 5


def test_beam_width_is_checked(hf_and_llm) -> None:
    _, llm = hf_and_llm
    with pytest.raises(ValueError, match="max_beam_width=4"):
        llm.generate(PROMPTS[0], SamplingParams(use_beam_search=True, best_of=5))
