"""The request path under atheris (libFuzzer, coverage-guided): `python -m tests.fuzz_request_path -runs=N DIR`.

Any exception but a GatewayError is a crash: libFuzzer stops and saves the
input; keep it in tests/fixtures/fuzz/ as a regression case.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["picker", "gateway_state"]):
    from tests.test_fuzz_request_path import RequestPath


def main() -> None:
    path = RequestPath()
    atheris.Setup(sys.argv, path.route)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
