"""The admin API's published OpenAPI schema, fuzzed by schemathesis against a running replica: no 5xx,
and every answer conforms to the schema."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from local_fleet.fleet import Fleet


def test_schemathesis_finds_no_server_error_and_no_schema_violation(fleet: Fleet, tmp_path: Path) -> None:
    if fleet.settings.redis_cluster_ports:
        pytest.skip("one run is enough: the API is the same on either Redis")
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis is not installed"
    base = f"http://127.0.0.1:{fleet.settings.picker_admin_ports[0]}"
    # The read token: drains are then refused (403) and the fuzzing changes nothing.
    result = subprocess.run([st, "run", f"{base}/openapi.json", "--url", base,
                             "-H", f"Authorization: Bearer {fleet.admin_tokens['read']}",
                             "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
                             "--max-examples", "40", "--seed", "7", "--no-color"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    print(result.stdout[-1500:])
    assert "passed" in result.stdout and "/admin/explain" in result.stdout
