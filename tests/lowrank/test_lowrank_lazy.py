"""Low-rank factorization under --lazy: the checkpoint holds exactly the tensors the eager run makes."""

import pytest
import torch

from slimlm.api import apply
from slimlm.errors import SlimlmError
from slimlm.io import load_compressed
from slimlm.lowrank import ASVD, SVD, SVDLLM
from slimlm.models import lazy_blocks, load_lazy, load_model
from slimlm.models.tiny import save_tiny_model_dir
from slimlm.nn import LowRankLinear
from slimlm.pipelines.lazy import check_lazy, compress_lazy
from slimlm.targets import Targets

CALIB = torch.randint(3, 512, (6, 24), generator=torch.Generator().manual_seed(0))

CONFIGS = {
    "svd-params": SVD(params=0.2),
    "svd-energy": SVD(energy=0.9),
    "svd-rank-lm_head": SVD(rank=4, targets=Targets(lm_head=True)),
    "asvd-params": ASVD(params=0.3),
    "svd_llm-params": SVDLLM(params=0.2),
    "svd_llm-energy-update": SVDLLM(energy=0.95, update=True),
    "svd_llm-rank": SVDLLM(rank=3),
}


@pytest.mark.parametrize("family, key", [*(("llama", k) for k in CONFIGS), ("gpt2", "svd_llm-params"),
                                         ("gpt2", "svd-params")])
def test_lazy_lowrank_equals_eager(tmp_path, family, key):
    config = CONFIGS[key]
    src = save_tiny_model_dir(tmp_path / "m", family)
    eager, _ = load_model(src)
    apply(eager, config, CALIB)
    husk, tok = load_lazy(src)
    compress_lazy(husk, tok, [config], tmp_path / "c", calib=CALIB)
    assert lazy_blocks(husk).peak_live == 1
    loaded, _ = load_compressed(tmp_path / "c")
    want, got = eager.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
    assert any(isinstance(m, LowRankLinear) for m in loaded.modules())


@pytest.mark.parametrize("cfg, pattern", [
    (SVDLLM(allocation="spectrum"), "allocation: spectrum reads every layer's spectrum"),
    (SVD(params=0.3, allocation="spectrum"), "with --lazy use allocation: uniform"),
    (ASVD(targets=Targets(lm_head=True)), "ASVD of lm_head needs a forward of the whole"),
])
def test_what_lazy_lowrank_cannot_do_is_refused_in_one_line(cfg, pattern):
    with pytest.raises(SlimlmError, match=pattern) as e:
        check_lazy([cfg])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("cfg", [SVD(), ASVD(energy=0.9), SVDLLM(rank=2), SVD(targets=Targets(lm_head=True))])
def test_uniform_energy_and_rank_budgets_pass_the_lazy_check(cfg):
    check_lazy([cfg])


def test_cli_compress_lazy_svd_llm(tmp_path, monkeypatch, capsys):
    from slimlm.cli import main

    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    src = str(save_tiny_model_dir(tmp_path / "m", "llama"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: lr\nsteps:\n  - method: svd_llm\n    params: 0.2\n")
    fast = ["--protocol", "pydoc-v1", "--tokens", "512", "--no-speed", "--calib-samples", "2", "--model", src]
    assert main(["compress", "--lazy", "--recipe", str(recipe), "--out", str(tmp_path / "o"), *fast]) == 0
    assert "saved to" in capsys.readouterr().out
