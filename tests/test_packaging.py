"""The deployment files agree with the code: compose commands, console scripts and example manifests."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from local_fleet.fleet import Fleet, FleetSettings

ROOT = Path(__file__).parent.parent


def test_compose_runs_the_example_fleet_with_real_entry_points(tmp_path: Path) -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    scripts = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]) | {"envoy"}
    services = compose["services"]
    for name, service in services.items():
        if service.get("image") == "inference-picker-fleet":
            assert service["command"][0] in scripts, name

    pods = services["pods"]["command"]
    declared = {pods[i + 1].split("@")[1]: pods[i + 1].split("@")[0] for i, a in enumerate(pods) if a == "--pod"}
    fleet = Fleet(FleetSettings(manifests_dir=ROOT / "examples" / "fleet", work_dir=tmp_path))
    assert declared == {key: name for key, (name, _) in fleet.pods().items()}

    controller = services["controller"]["command"]
    picker_endpoints = {controller[i + 1] for i, a in enumerate(controller) if a == "--picker-endpoint"}
    grpc = {s["command"][s["command"].index("--grpc-address") + 1] for n, s in services.items()
            if n.startswith("picker-")}
    assert picker_endpoints == grpc
    assert controller[controller.index("--manifests") + 1] == "/app/examples/fleet"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make up" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
