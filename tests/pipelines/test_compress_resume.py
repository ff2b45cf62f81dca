"""A ``slimlm compress`` run killed in the middle of its training step and started again with the same
command resumes from its last checkpoint and writes the same checkpoint as a run never interrupted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from slimlm.models.tiny import save_tiny_model_dir

WORKER = Path(__file__).with_name("compress_kill_worker.py")
STEPS = 8
RECIPE = f"""name: kd-resume
steps:
  - method: magnitude
    sparsity: 0.5
  - method: distill
    steps: {STEPS}
    seq_len: 32
    batch_size: 2
    samples: 8
    checkpoint_every: 2
"""


def _compress(kill_at: int, model: str, recipe: Path, out: Path) -> subprocess.CompletedProcess:
    args = ["compress", "--model", model, "--recipe", str(recipe), "--out", str(out), "--protocol", "pydoc-v1",
            "--tokens", "512", "--no-speed", "--json", str(out) + ".json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(WORKER), str(kill_at), "--", *args], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip


def _weights(out: Path) -> dict:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_killed_compress_resumes_to_the_same_checkpoint(tmp_path):
    model = str(save_tiny_model_dir(tmp_path / "tiny", family="llama"))
    recipe = tmp_path / "kd-resume.yaml"
    recipe.write_text(RECIPE)
    whole = _compress(0, model, recipe, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr

    killed = _compress(4, model, recipe, tmp_path / "cut")
    assert killed.returncode == -9, killed.stderr  # SIGKILL after the step-4 state was written
    assert (tmp_path / "cut.train" / "step1-distill" / "train-state.pt").is_file() and not (tmp_path / "cut").exists()
    again = _compress(0, model, recipe, tmp_path / "cut")
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "cut.train").exists()

    doc = json.loads((tmp_path / "cut.json").read_text())
    training = [r for r in doc["results"] if r.get("training")][0]["training"][0]
    assert training["resumed_from"] == 4 and len(training["losses"]) == STEPS
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) > 0
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
