"""The lm-eval adapter on tiny models: its scores equal a direct computation from the model's logits,
rolling scores equal perplexity's NLL, compressed models run, and the registered name loads a checkpoint."""

import pytest
import torch
import torch.nn.functional as F

from lm_eval import simple_evaluate
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from slimlm.api import apply
from slimlm.eval.accuracy import slimlm_lm, task_manager
from slimlm.eval.quality import token_nll, window_logprobs
from slimlm.io import save_compressed
from slimlm.models.tiny import tiny_model, tiny_tokenizer
from slimlm.nn import QuantLinear
from slimlm.quant import RTN
from slimlm.targets import Targets

CONTEXTS = ["The quick brown", "Compression makes large language models smaller, faster and", "One, two, three,",
            "", "The capital of France is"]  # fmt: skip
CONTINUATIONS = [" fox", " cheaper: quantization", " four", "Paris", " Paris. The capital"]


def _model(kind: str):
    model = tiny_model("llama", seed=1)
    if kind == "rtn-int4":  # every linear, lm_head included, through slimlm's runtime modules
        apply(model, RTN(scheme="int4-g16", targets=Targets(lm_head=True)))
        assert isinstance(model.lm_head, QuantLinear)
    return model


def _direct(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """log p(cont | ctx) and whether cont is the greedy continuation, from one forward's logits."""
    ids = torch.tensor([ctx + cont])
    logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)  # (T, V)
    rows = logp[len(ctx) - 1 : len(ctx) - 1 + len(cont)]  # the positions that predict cont
    target = torch.tensor(cont)
    return rows.gather(-1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def _split(tok, context: str, continuation: str, prefix: int) -> tuple[list[int], list[int]]:
    """The (context, continuation) ids lm-eval scores: the whole text split after the context's tokens."""
    if not context:
        return [prefix], tok(continuation, add_special_tokens=False)["input_ids"]
    whole, ctx = tok(context + continuation)["input_ids"], tok(context)["input_ids"]
    return ctx, whole[len(ctx) :]


def _greedy_request(model, tok) -> tuple[str, str]:
    """A (context, continuation) whose continuation is the model's own next token, so greedy is True."""
    ctx = tok("The quick brown")["input_ids"]
    with torch.no_grad():
        nxt = int(model(input_ids=torch.tensor([ctx])).logits[0, -1].argmax())
    continuation = tok.decode([nxt])
    assert tok("The quick brown" + continuation)["input_ids"] == ctx + [nxt], "the greedy token must re-tokenize"
    return "The quick brown", continuation


@pytest.mark.parametrize("add_bos", [True, False])
@pytest.mark.parametrize("kind", ["float", "rtn-int4"])
def test_loglikelihood_equals_the_logits(kind, add_bos):
    model, tok = _model(kind), tiny_tokenizer(add_bos=add_bos)
    pairs = [*zip(CONTEXTS, CONTINUATIONS), _greedy_request(model, tok)]
    lm = slimlm_lm(model, tok, batch_size=3)  # batches of unequal lengths: padding must not leak
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    want = [_direct(model, *_split(tok, c, x, lm.prefix_token_id)) for c, x in pairs]
    assert [g for _, g in got] == [g for _, g in want] and want[-1][1] is True
    torch.testing.assert_close(torch.tensor([s for s, _ in got]), torch.tensor([s for s, _ in want]),
                               rtol=1e-5, atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("add_bos", [True, False])
def test_rolling_loglikelihood_is_perplexity_nll(add_bos):
    """The rolling score of a text is minus the summed token NLL slimlm's perplexity gives the window
    [prefix] + text (with a BOS tokenizer, exactly the protocol's '+bos' window; BOS never a target)."""
    model, tok = _model("float"), tiny_tokenizer(add_bos=add_bos)
    lm = slimlm_lm(model, tok, batch_size=2)
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris. Berlin. One, two, three, four, five."]
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                   disable_tqdm=True)  # fmt: skip
    for text, score in zip(texts, got):
        window = torch.tensor([lm.prefix_token_id, *tok(text, add_special_tokens=False)["input_ids"]])
        assert score == pytest.approx(-token_nll(window_logprobs(model, window), window).sum().item(), abs=1e-3)


def test_rolling_windows_cover_every_token_once():
    """A text longer than max_length: lm-eval's disjoint windows, each text token scored once."""
    model, tok = _model("float"), tiny_tokenizer(add_bos=True)
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = tok(text, add_special_tokens=False)["input_ids"]
    lm = slimlm_lm(model, tok, max_length=16)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.prefix_token_id, 16, 1)]
    assert sum(len(pred) for _, pred in windows) == len(ids) and len(windows) > 2
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    assert got == pytest.approx(sum(_direct(model, ctx, pred)[0] for ctx, pred in windows), abs=1e-3)


def test_the_callers_tokenizer_is_left_alone():
    tok = tiny_tokenizer()
    tok.pad_token = None  # HFLM would set one
    slimlm_lm(_model("float"), tok)
    assert tok.pad_token is None


def test_lm_eval_model_slimlm_loads_a_compressed_checkpoint(tmp_path):
    """`lm_eval --model slimlm --model_args model=<checkpoint>`: the registered name, string arguments."""
    model, tok = _model("rtn-int4"), tiny_tokenizer(add_bos=True)
    ckpt = save_compressed(model, tok, tmp_path / "ckpt")
    out = simple_evaluate(model="slimlm", model_args=f"model={ckpt},dtype=float32", tasks=["slimlm_pydoc_choice"],
                          task_manager=task_manager(hub_tasks=False), limit=4, device="cpu", batch_size=2,
                          log_samples=False, bootstrap_iters=0)  # fmt: skip
    assert 0.0 <= out["results"]["slimlm_pydoc_choice"]["acc,none"] <= 1.0
