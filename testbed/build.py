"""Builds the Go programs in `testbed/go/` once per version, into a cache outside the checkout.

Each program is a small Go module (go.mod, go.sum, sometimes a main.go) whose
`tool` directive or own main package names what to build. The cache key is a
hash of those files, so a version bump rebuilds and an unchanged one is free;
a fresh machine builds each once. `python -m testbed.build` builds them all.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from local_fleet.build_cache import build_once, cache_root

GO_DIR = Path(__file__).parent / "go"


@dataclass(frozen=True)
class GoProgram:
    name: str  # the binary's name and its module's folder under testbed/go/
    package: str  # what `go build` compiles inside that module

    @property
    def module_dir(self) -> Path:
        return GO_DIR / self.name

    def key(self) -> str:
        digest = hashlib.sha256()
        for path in sorted(self.module_dir.iterdir()):
            if path.is_file():
                digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return digest.hexdigest()[:16]


PROGRAMS = {
    "kube-apiserver": GoProgram("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver"),
    "etcd": GoProgram("etcd", "."),
    "envoy-gateway": GoProgram("envoy-gateway", "github.com/envoyproxy/gateway/cmd/envoy-gateway"),
    # The upstream endpoint picker, a peer of the benchmarks (benchmarks/upstream_epp.py).
    "epp": GoProgram("epp", "sigs.k8s.io/gateway-api-inference-extension/cmd/epp"),
}
TESTS_NEED = ("kube-apiserver", "etcd", "envoy-gateway")


def cache_dir() -> Path:
    """Outside the checkout, so every clone on the machine (CI's too) shares the builds."""
    given = os.environ.get("TESTBED_CACHE")
    return Path(given) if given else cache_root() / "go-tools"


def binary(name: str) -> Path:
    """The built binary of one program, building it first if this version is not cached."""
    program = PROGRAMS[name]
    return build_once(cache_dir() / f"{program.name}-{program.key()}" / program.name,
                      lambda target: _build(program, target))


def _go() -> str:
    """The Go toolchain: on PATH, or where its installer puts it (a non-login shell may lack it on PATH)."""
    found = shutil.which("go") or next((p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go")
                                        if os.access(p, os.X_OK)), None)
    if found is None:
        raise RuntimeError("building the test infrastructure needs the Go toolchain (go 1.26 or later) on PATH")
    return found


def _build(program: GoProgram, target: Path) -> None:
    go = _go()
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=readonly -buildvcs=false")
    partial = target.with_name(target.name + ".partial")
    started = time.monotonic()
    print(f"building {program.name} ({program.package}) into {target.parent} ...", file=sys.stderr, flush=True)
    subprocess.run([go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(partial), program.package],
                   cwd=program.module_dir, env=env, check=True)
    partial.rename(target)
    print(f"built {program.name} in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="testbed.build", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"programs to build, of {', '.join(PROGRAMS)} "
                                                 f"(default: those the tests run, {', '.join(TESTS_NEED)})")
    names = parser.parse_args(argv).names or list(TESTS_NEED)
    unknown = [n for n in names if n not in PROGRAMS]
    if unknown:
        parser.error(f"unknown program {unknown[0]!r}; known: {', '.join(PROGRAMS)}")
    for name in names:
        print(binary(name))


if __name__ == "__main__":
    main()
