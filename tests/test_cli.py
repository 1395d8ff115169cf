"""The command line and fl.load as a user meets them: real model, real processes."""

import subprocess
import sys

import pytest

import foresight_lab as fl
from foresight_lab.weights.gguf import NotAModelError


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "foresight_lab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.real_model
def test_generate_prints_a_greedy_completion(smollm2_path):
    result = cli("generate", "The capital of France is", "--temperature", "0", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The capital of France is Paris")


@pytest.mark.real_model
def test_pull_prints_the_cached_path(smollm2_path):
    result = cli("pull", "smollm2-135m")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(smollm2_path)


def test_an_unknown_model_exits_2_and_lists_the_aliases():
    result = cli("generate", "no-such-model", "hello")
    assert result.returncode == 2
    assert "smollm2-135m" in result.stderr and "no-such-model" in result.stderr


def test_loading_an_unknown_alias_says_what_models_exist():
    with pytest.raises(fl.ModelNotFoundError, match="smollm2-135m"):
        fl.load("llama-9000")


def test_loading_a_file_that_is_not_a_model_says_so(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(NotAModelError, match="not a readable GGUF file"):
        fl.load(str(path))
