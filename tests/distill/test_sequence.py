"""teacher_sequences: slimlm's decode loop, greedy, equals HF generate and keeps a fixed length."""

import pytest
import torch

from slimlm.distill.sequence import teacher_sequences
from slimlm.errors import SlimlmError
from slimlm.models.tiny import EOS_ID, tiny_model

_g = torch.Generator().manual_seed(0)
PROMPTS = torch.randint(3, 512, (5, 4), generator=_g)  # (N, P)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # fast decoder path, HF decoder path
def test_greedy_sequences_equal_hf_generate_with_a_fixed_shape(family):
    teacher = tiny_model(family)
    got = teacher_sequences(teacher, PROMPTS, new_tokens=6, batch_size=2)
    assert got.shape == (5, 10) and got.dtype == torch.long and torch.equal(got[:, :4], PROMPTS)
    teacher.generation_config.eos_token_id = None  # HF stops at EOS; teacher_sequences never does
    ref = teacher.generate(PROMPTS, attention_mask=torch.ones_like(PROMPTS), do_sample=False, max_new_tokens=6,
                           pad_token_id=0)  # fmt: skip
    assert torch.equal(got, ref)


def test_rows_keep_their_length_past_an_eos():
    teacher = tiny_model("llama")
    head = torch.nn.Linear(64, 512, bias=True)  # make EOS the greedy choice everywhere: the loop must not stop
    head.weight = teacher.lm_head.weight
    with torch.no_grad():
        head.bias.zero_()[EOS_ID] = 1e4
    teacher.lm_head = head
    got = teacher_sequences(teacher, PROMPTS[:3], new_tokens=3)
    assert got.shape == (3, 7) and (got[:, 4:] == EOS_ID).all()


def test_sampling_is_seeded_and_refusals():
    teacher = tiny_model("llama")
    a = teacher_sequences(teacher, PROMPTS, new_tokens=5, temperature=1.5, seed=3, batch_size=3)
    b = teacher_sequences(teacher, PROMPTS, new_tokens=5, temperature=1.5, seed=3, batch_size=3)
    greedy = teacher_sequences(teacher, PROMPTS, new_tokens=5, batch_size=3)
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    with pytest.raises(SlimlmError, match=r"prompts must be a \(N, P\) long tensor"):
        teacher_sequences(teacher, PROMPTS.float(), new_tokens=2)
    with pytest.raises(SlimlmError, match="new_tokens and batch_size must be >= 1"):
        teacher_sequences(teacher, PROMPTS, new_tokens=0)
