import pytest
import torch

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.formats import parse_scheme
from slimlm.generation.decoder import FAST_FAMILIES, make_decoder
from slimlm.generation.loop import GenerationConfig, generate, stream_text, stream_tokens
from slimlm.generation.sampling import Sampling
from slimlm.models.tiny import EOS_ID, PAD_ID, tiny_tokenizer
from slimlm.quant import RTN
from tests.generation.conftest import varied_tiny

PROMPTS = [[5, 17, 99, 230, 41], [8, 300, 77], [12, 450, 64, 3, 200, 201, 202], [9]]


def _hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=PAD_ID)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", [*FAST_FAMILIES, "gpt2", "opt", "phi3", "gemma2", "gemma3"])
def test_greedy_equals_hf_generate(family):
    model = varied_tiny(family)
    dec = make_decoder(model)
    ours = generate(dec, PROMPTS[:2], GenerationConfig(max_new_tokens=36))  # past gemma2/3's window of 32
    assert ours == [_hf_greedy(model, p, 36) for p in PROMPTS[:2]]


@pytest.mark.parametrize("scheme", ["int8-channel-sym", "int4-g16"])
def test_greedy_equals_hf_generate_quantized(scheme):
    model = varied_tiny("llama")
    apply(model, RTN(scheme=parse_scheme(scheme)))
    dec = make_decoder(model)
    assert generate(dec, PROMPTS[:1], GenerationConfig(max_new_tokens=24)) == [_hf_greedy(model, PROMPTS[0], 24)]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_batched_equals_one_by_one(family):
    dec = make_decoder(varied_tiny(family))
    cfg = GenerationConfig(max_new_tokens=16)
    one = generate(dec, PROMPTS, cfg, batch_size=1)
    assert generate(dec, PROMPTS, cfg, batch_size=4) == one
    assert generate(dec, PROMPTS, cfg, batch_size=3) == one  # uneven last batch


def test_sampling_reproducible_with_a_seed_and_batched_rows_differ():
    dec = make_decoder(varied_tiny("qwen2"))
    cfg = lambda seed: GenerationConfig(max_new_tokens=20, sampling=Sampling(1.0, top_k=50, top_p=0.95, seed=seed))
    a, b, c = (generate(dec, [PROMPTS[0]] * 2, cfg(s), batch_size=2) for s in (3, 3, 4))
    assert a == b
    assert a != c
    assert a[0] != a[1]  # one generator, two rows: different draws
    greedy = generate(dec, [PROMPTS[0]], GenerationConfig(max_new_tokens=20))[0]
    assert a[0] != greedy


def test_stop_tokens_stop_each_row():
    dec = make_decoder(varied_tiny("llama"))
    free = generate(dec, PROMPTS, GenerationConfig(max_new_tokens=12))
    stop = free[0][4]
    out = generate(dec, PROMPTS, GenerationConfig(max_new_tokens=12, stop_tokens=(stop,)), batch_size=4)
    for row, full in zip(out, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]
    assert list(stream_tokens(dec, PROMPTS[0], GenerationConfig(12, stop_tokens=(stop,)))) == out[0]
    assert out[0][-1] == stop and len(out[0]) <= 5


def test_stream_text_pieces_join_to_the_decoded_text():
    dec, tok = make_decoder(varied_tiny("llama")), tiny_tokenizer()
    ids = tok("The capital of France").input_ids
    cfg = GenerationConfig(max_new_tokens=20, stop_tokens=(EOS_ID,))
    pieces = list(stream_text(dec, tok, ids, cfg))
    full = generate(dec, [ids], cfg)[0]
    assert "".join(pieces) == tok.decode(full, skip_special_tokens=True)
    assert len(pieces) > 1


def test_bad_configs_refused():
    with pytest.raises(SlimlmError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(SlimlmError, match="top_p"):
        Sampling(1.0, top_p=1.5)
    dec = make_decoder(varied_tiny("llama"))
    with pytest.raises(SlimlmError, match="at least one token"):
        generate(dec, [[]], GenerationConfig(4))
