"""A killed training run resumes to the same weights, bit for bit; another run's or a broken state is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimlm.errors import SlimlmError
from slimlm.models.tiny import tiny_model
from slimlm.train import STATE_FILE, TrainConfig, next_token_objective, train

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("resume_worker.py")
PATTERN = (torch.randint(0, 400, (16, 1), generator=torch.Generator().manual_seed(0)) + torch.arange(32)) % 500 + 3


def _worker(state_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(WORKER), "--state-dir", str(state_dir), "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen) -> int:
    output, _ = proc.communicate(timeout=120)
    return proc.returncode if proc.returncode == -9 or proc.returncode == 0 else pytest.fail(output.decode()[-3000:])


def test_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(tmp_path):
    resumed, reference = tmp_path / "resumed.pt", tmp_path / "reference.pt"
    killed = _worker(tmp_path / "state", resumed, "--kill-at", "7")  # the two first runs side by side
    plain = _worker(tmp_path / "fresh", reference)
    assert _finish(killed) == -9 and _finish(plain) == 0
    saved = torch.load(tmp_path / "state" / STATE_FILE, weights_only=True)
    assert saved["step"] == 6 and len(saved["losses"]) == 6  # checkpoint_every=3: the kill at step 7 lost 7, 8
    assert not resumed.exists()
    assert _finish(_worker(tmp_path / "state", resumed)) == 0  # the same command, without the kill
    got, want = torch.load(resumed, weights_only=True), torch.load(reference, weights_only=True)
    assert got.keys() == want.keys() and "drift" in got and "proj.weight" in got
    for name in want:
        assert torch.equal(got[name], want[name]), name
    report = json.loads(Path(f"{resumed}.json").read_text())
    plain_report = json.loads(Path(f"{reference}.json").read_text())
    assert report["resumed_from"] == 6 and plain_report["resumed_from"] is None
    assert report["losses"] == plain_report["losses"] and len(report["losses"]) == 12
    assert report["tokens"] == 12 * 2 * 2 * 16 and report["precision"] == "fp32"
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == [STATE_FILE]  # no temp file left


def _trained(model):
    return list(model.model.layers[0].mlp.parameters())


CONFIG = TrainConfig(steps=4, lr=1e-3, seq_len=16, batch_size=2, checkpoint_every=2, precision="fp32")
FACTS = {"model": "tiny-llama", "recipe": "test", "step": 0}


def _run(state_dir, *, config=CONFIG, fingerprint=FACTS, objective=next_token_objective):
    model = tiny_model("llama")
    report = train(model, _trained(model), objective, PATTERN, config, state_dir=state_dir, fingerprint=fingerprint)
    return model, report


def test_finished_state_returns_its_losses_and_weights_without_training(tmp_path):
    trained, first = _run(tmp_path)
    calls = []
    model, again = _run(tmp_path, objective=lambda m, ids: calls.append(1) or next_token_objective(m, ids))
    assert calls == [] and again.losses == first.losses and again.resumed_from == 4
    for (name, p), q in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(p, q), name  # the saved weights are loaded, not the fresh model's


@pytest.mark.parametrize("change, key", [
    (dict(fingerprint={**FACTS, "recipe": "other"}), "'recipe' differs"),
    (dict(fingerprint={**FACTS, "extra": 1}), "'extra' differs"),
    (dict(config=TrainConfig(steps=4, lr=2e-3, seq_len=16, batch_size=2, checkpoint_every=2)), "'config.lr' differs"),
])  # fmt: skip
def test_another_runs_state_is_refused_with_nothing_changed(tmp_path, change, key):
    _run(tmp_path)
    before = (tmp_path / STATE_FILE).read_bytes()
    model = tiny_model("llama")
    fresh = {n: p.clone() for n, p in model.state_dict().items()}
    kw = {"config": CONFIG, "fingerprint": FACTS, **change}
    with pytest.raises(SlimlmError, match=rf"{tmp_path} holds the training state of another run: .*{key}.*remove"):
        train(model, _trained(model), next_token_objective, PATTERN, kw["config"], state_dir=tmp_path,
              fingerprint=kw["fingerprint"])  # fmt: skip
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert all(torch.equal(p, fresh[n]) for n, p in model.state_dict().items())


def test_unreadable_state_and_bad_fingerprint_refused_in_one_line(tmp_path):
    (tmp_path / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(SlimlmError, match=r"unreadable training state .*; remove .* or choose another output") as e:
        _run(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.raises(SlimlmError, match="fingerprint must be JSON-able"):
        _run(tmp_path / "new", fingerprint={"model": object()})


def test_state_saved_every_checkpoint_and_after_the_last_step(tmp_path):
    seen = []

    def on_step(step):
        path = tmp_path / STATE_FILE
        seen.append(torch.load(path, weights_only=True)["step"] if path.exists() else None)

    model = tiny_model("llama")
    config = TrainConfig(steps=5, lr=1e-3, seq_len=16, batch_size=2, checkpoint_every=2, precision="fp32")
    train(model, _trained(model), next_token_objective, PATTERN, config, on_step=on_step, state_dir=tmp_path)
    assert seen == [None, None, 2, 2, 4]  # on_step runs before its step's save
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["step"] == 5
