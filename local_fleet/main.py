"""`make up`: run the fleet on loopback until Ctrl-C.

Starts its own Redis unless REDIS_URL is set, then the pods (simulated, or llama.cpp's server for a
pool that declares that engine), the controller, Envoy, a collector and two picker replicas.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from local_fleet.fleet import Fleet, FleetSettings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="local-fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifests", type=Path, default=Path("examples/fleet"))
    p.add_argument("--work-dir", type=Path, default=Path(".fleet"), help="logs and Envoy's config go here")
    p.add_argument("--port-base", type=int, default=0,
                   help="move the fleet's own ports (Redis, pickers, their metrics, Envoy admin, the pickers' admin "
                        "APIs) to this port and the seven after it, so two fleets can share a machine; the listeners "
                        "come from the manifests")
    a = p.parse_args(argv)
    ports = {}
    if a.port_base:
        b = a.port_base
        ports = {"redis_port": b, "picker_ports": (b + 1, b + 2), "picker_metrics_ports": (b + 3, b + 4),
                 "envoy_admin_port": b + 5, "picker_admin_ports": (b + 6, b + 7)}
    settings = FleetSettings(manifests_dir=a.manifests.resolve(), work_dir=a.work_dir.resolve(),
                             redis_url=os.environ.get("REDIS_URL") or None, **ports)
    fleet = Fleet(settings)
    # A plain flag: setting a threading.Event in a handler can deadlock on the lock the main thread holds.
    signals: list[int] = []
    signal.signal(signal.SIGTERM, lambda sig, _: signals.append(sig))
    signal.signal(signal.SIGINT, lambda sig, _: signals.append(sig))
    try:
        fleet.start()
        _print_hints(fleet)
        fleet.supervise(lambda: bool(signals), lambda line: print(line, file=sys.stderr, flush=True))
    finally:
        print("stopping the fleet ...", file=sys.stderr)
        fleet.stop()


def _print_hints(fleet: Fleet) -> None:
    pods, real = fleet.pods(), fleet.llama_cpp_pods()
    tokens = fleet.admin_tokens
    admin = f"http://127.0.0.1:{fleet.settings.picker_admin_ports[0]}" if fleet.settings.picker_admin_ports else "-"
    model = next(iter(real.values()), "/models/Qwen3-32B")
    example = json.dumps({"model": model, "max_tokens": 50,
                          "messages": [{"role": "user", "content": "Hello, this is a test"}]})
    kinds = ", ".join(f"{n} {kind} pods" for n, kind in ((len(real), "llama.cpp"), (len(pods) - len(real), "simulated"))
                      if n)
    simulated = next((key for key in pods if key not in real), None)
    load_hint = f"""  Load a pod artificially: curl -X POST http://{simulated}/sim/load -d '{{"requests": 64}}'
""" if simulated else ""
    print(f"""
The fleet is up: Redis at {fleet.redis_url}, {kinds}, 2 pickers, Envoy.
A process that exits is restarted; only Ctrl-C or SIGTERM stops the fleet.

  Through the picker (:8080):
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{example}'
  Plain round robin over the same pods (:8081): the same command on port 8081.
  Which pod served: the x-inference-pod response header (curl -i), and
    grep "Request Handled" {fleet.log_path('picker-0')} {fleet.log_path('picker-1')}
  Picker metrics: http://127.0.0.1:{fleet.settings.picker_metrics_ports[0]}/metrics   Envoy admin: http://127.0.0.1:{fleet.settings.envoy_admin_port}
{load_hint}
  Admin API and status page (tokens in {fleet.settings.work_dir / 'admin-tokens.yaml'}):
    status page:  {admin}/?token={tokens.get('read', '')}
    why a pod:    curl -H 'Authorization: Bearer {tokens.get('read', '')}' -X POST {admin}/admin/explain -d '{example}'
    drain a pod:  curl -H 'Authorization: Bearer {tokens.get('admin', '')}' -X POST \\
                    {admin}/admin/pools/{fleet.first_pool()}/endpoints/{next(iter(pods))}/drain
    API schema:   {admin}/docs   Runbook: docs/operations.md#runbook

Logs: {fleet.settings.work_dir / 'logs'}. Ctrl-C stops everything.
""", flush=True)


if __name__ == "__main__":
    main()
