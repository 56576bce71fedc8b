"""llama.cpp runs in a child process: a crash there is one clear error, never the death of the caller (or of this
test run); and the llama.cpp that `make install` builds runs on any x86-64 CPU with AVX2."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from finetune.llama_cpp_runner import PORTABLE_REBUILD, ChildFailed, run_in_child


def die_of(name: str) -> None:
    """Runs in the child: it dies of a real signal, as llama.cpp does on a refused instruction or a bad read."""
    os.kill(os.getpid(), getattr(signal, name))


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def import_llama_cpp(_: object) -> str:
    import llama_cpp  # noqa: F401 - the import is what is tested

    return "loaded"


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("SIGILL", "CPU instruction this machine refuses"),
        ("SIGSEGV", "crashed reading or running the file"),
        ("SIGKILL", "out-of-memory killer"),
    ],
)
def test_a_child_that_dies_of_a_signal_becomes_one_clear_error(name, cause):
    with pytest.raises(ChildFailed) as error:
        run_in_child(die_of, name, what="GGUF export check in llama.cpp")
    message = str(error.value)
    assert message.startswith("GGUF export check in llama.cpp: the llama.cpp process died of " + name)
    assert cause in message
    if name == "SIGILL":
        assert PORTABLE_REBUILD in message and "-DGGML_NATIVE=OFF" in message


def test_an_exception_in_the_child_comes_back_with_its_type_and_message():
    with pytest.raises(ChildFailed, match=r"^scoring: ValueError: no rows$"):
        run_in_child(raise_value_error, "no rows", what="scoring")


def test_a_native_library_that_does_not_load_is_a_clear_error(tmp_path, monkeypatch):
    """A llama_cpp whose shared library cannot be loaded (here a stand-in package that fails as ctypes does) gives the
    reinstall command, in the child, and the caller carries on."""
    fake = tmp_path / "llama_cpp"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "raise OSError('libllama.so: cannot open shared object file: No such file or directory')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    from finetune import llama_cpp_runner

    with pytest.raises(ChildFailed) as error:
        run_in_child(llama_cpp_runner._inspect, {"model": "x.gguf"}, what="GGUF export check in llama.cpp")
    assert "native library does not load (libllama.so: cannot open shared object file" in str(error.value)
    assert PORTABLE_REBUILD in str(error.value)


def test_the_real_llama_cpp_loads_in_a_child():
    assert run_in_child(import_llama_cpp, None, what="import") == "loaded"


# AMX tile instructions (what killed `make test` on Intel Xeons) and any AVX-512 (zmm registers): a portable build
# (GGML_NATIVE=OFF) has neither; a -march=native build on a machine with them has both.
_NOT_PORTABLE = re.compile(r"^\s*[0-9a-f]+:\s+(tile\w*|tdp\w+|ldtilecfg|sttilecfg)\b|%tmm\d|%zmm\d+", re.MULTILINE)


def _non_portable_instructions(library: Path) -> tuple[list[str], str]:
    objdump = shutil.which("objdump")
    assert objdump, (
        "objdump (Debian package binutils) is needed to read the llama.cpp library: apt-get install binutils"
    )
    listing = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout
    return sorted({(m.group(1) or m.group(0)).strip() for m in _NOT_PORTABLE.finditer(listing)}), listing


def test_the_instruction_scan_finds_amx_and_avx512_in_a_native_build(tmp_path):
    """What the scan below would report for a library built for a Xeon with AMX and AVX-512 (compiled here)."""
    source = tmp_path / "native.c"
    source.write_text(
        "#include <immintrin.h>\n"
        "void zero_tile(void) { _tile_zero(4); }\n"
        "__m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }\n"
    )
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler (Debian package gcc) is needed for this test"
    library = tmp_path / "libnative.so"
    subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-mamx-tile", "-mavx512f", str(source), "-o", str(library)], check=True
    )
    found, _ = _non_portable_instructions(library)
    assert "tilezero" in found and "%tmm4" in found and any(f.startswith("%zmm") for f in found)


def test_the_installed_llama_cpp_has_no_amx_or_avx512_instructions():
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin, "llama-cpp-python is not installed: run `make install`"
    libraries = sorted(p for p in (Path(spec.origin).parent / "lib").glob("*.so") if not p.is_symlink())
    assert any(p.name.startswith("libggml-cpu") for p in libraries), f"no libggml-cpu in {[p.name for p in libraries]}"
    for library in libraries:
        found, listing = _non_portable_instructions(library)
        assert not found, (
            f"{library.name} contains instructions not every x86-64 CPU runs ({', '.join(found[:8])}): it was built "
            f"with -march=native. Rebuild it: {PORTABLE_REBUILD}"
        )
        if library.name.startswith("libggml-cpu"):
            assert "%ymm" in listing, "libggml-cpu has no AVX2 code: the build lost its vector kernels"
