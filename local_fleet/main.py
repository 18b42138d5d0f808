"""`make up`: run the fleet on loopback until Ctrl-C.

Starts its own Redis unless REDIS_URL is set, then the simulated pods, the
controller, Envoy, a collector and two picker replicas.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from local_fleet.fleet import Fleet, FleetSettings


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="local-fleet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifests", type=Path, default=Path("examples/fleet"))
    p.add_argument("--work-dir", type=Path, default=Path(".fleet"), help="logs and Envoy's config go here")
    a = p.parse_args(argv)
    settings = FleetSettings(manifests_dir=a.manifests.resolve(), work_dir=a.work_dir.resolve(),
                             redis_url=os.environ.get("REDIS_URL") or None)
    fleet = Fleet(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        fleet.start()
        _print_hints(fleet)
        while not stop.wait(1.0):
            dead = [n for n, proc in fleet.processes.items() if proc.poll() is not None]
            if dead:
                print(f"{', '.join(dead)} exited; see {fleet.log_path(dead[0])}", file=sys.stderr)
                break
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the fleet ...", file=sys.stderr)
        fleet.stop()


def _print_hints(fleet: Fleet) -> None:
    pods = fleet.pods()
    example = json.dumps({"model": "/models/Qwen3-32B", "max_tokens": 50,
                          "messages": [{"role": "user", "content": "Hello, this is a test"}]})
    print(f"""
The fleet is up: Redis at {fleet.redis_url}, {len(pods)} simulated pods, 2 pickers, Envoy.

  Through the picker (:8080):
    curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{example}'
  Plain round robin over the same pods (:8081): the same command on port 8081.
  Which pod served: the x-inference-pod response header (curl -i), and
    grep "Request Handled" {fleet.log_path('picker-0')} {fleet.log_path('picker-1')}
  Picker metrics: http://127.0.0.1:9102/metrics   Envoy admin: http://127.0.0.1:{fleet.settings.envoy_admin_port}
  Load a pod artificially: curl -X POST http://{next(iter(pods))}/sim/load -d '{{"requests": 64}}'

Logs: {fleet.settings.work_dir / 'logs'}. Ctrl-C stops everything.
""", flush=True)


if __name__ == "__main__":
    main()
