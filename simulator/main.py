"""Entry point: host many simulated pods, each on its own address, in one process.

    model-server-simulator --pod qwen-0@127.0.0.11:8000 --pod qwen-1@127.0.0.12:8000 \
        --runtime vllm --model /models/Qwen3-32B

Loopback has the whole 127.0.0.0/8 range, so pods can share the pool's target
port on distinct addresses, exactly as pods in a cluster do.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import fields
from pathlib import Path

from aiohttp import web

from simulator import tokenizer
from simulator.block_hashes import VLLM_ALGORITHMS
from simulator.kv_events import ENCODINGS, KvEventsConfig
from simulator.physics import Physics
from simulator.pod import PodSpec, SimulatedPod

log = logging.getLogger("simulator")


def parse_pod(value: str) -> tuple[str, str, int]:
    try:
        name, address = value.split("@", 1)
        host, port = address.rsplit(":", 1)
        return name, host, int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME@HOST:PORT, got {value!r}") from None


def parse_module(value: str) -> tuple[str, str]:
    name, _, path = value.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="model-server-simulator", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pod", action="append", type=parse_pod, required=True, help="NAME@HOST:PORT, repeatable")
    p.add_argument("--runtime", choices=("vllm", "sglang"), default="vllm")
    p.add_argument("--model", default="/models/Qwen3-32B")
    p.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters, as vLLM's flag")
    p.add_argument("--lora-modules", nargs="+", type=parse_module, default=[], metavar="NAME=PATH",
                   help="adapters served from the start (with --enable-lora)")
    p.add_argument("--max-loras", type=int, default=1, help="distinct adapters in one running batch")
    p.add_argument("--max-cpu-loras", type=int, default=None, help="adapters kept in CPU memory (default: max-loras)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="GGUF file whose tokenizer and chat template the pods use (default: the bundled SmolLM2's)")
    p.add_argument("--kv-events-config", default=None, metavar="JSON",
                   help="publish KV-cache events, as the engine's flag: vLLM's {\"enable_kv_cache_events\": true, "
                        "\"publisher\": \"zmq\", \"endpoint\": \"tcp://*:5557\", \"replay_endpoint\": ...}, SGLang's "
                        "{\"publisher\": \"zmq\", ...}; `*` binds each pod's own address")
    p.add_argument("--kv-events-encoding", choices=ENCODINGS, default="array",
                   help="events as positional arrays (earlier vLLM releases, SGLang) or maps tagged by `type`")
    p.add_argument("--data-parallel-rank", type=int, default=0, help="offsets the KV-events ports, as vLLM's DP ranks")
    p.add_argument("--prefix-caching-hash-algo", choices=tuple(VLLM_ALGORITHMS), default="sha256",
                   help="vLLM's block-hash algorithm (PYTHONHASHSEED seeds it; random per process otherwise)")
    p.add_argument("--disaggregation-mode", choices=("null", "prefill", "decode"), default="null",
                   help="SGLang prefill/decode disaggregation: the side these pods run")
    p.add_argument("--disaggregation-bootstrap-port", type=int, default=8998,
                   help="where a prefill pod serves its bootstrap rooms (on its own address)")
    p.add_argument("--bootstrap-timeout-s", type=float, default=30.0,
                   help="how long a decode request waits for its prefill before failing")
    defaults = Physics()
    for f in fields(Physics):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"physics: {f.name} (default %(default)s)")
    return p


async def serve(pods: list[SimulatedPod]) -> None:
    runners, engines = [], []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for pod in pods:
            if pod.events is not None:
                pod.events.start()
            engines.append(asyncio.create_task(pod.engine.run(), name=f"engine-{pod.spec.name}"))
            runner = web.AppRunner(pod.app(), access_log=None, handle_signals=False)
            await runner.setup()
            await web.TCPSite(runner, pod.spec.host, pod.spec.port, reuse_address=True).start()
            runners.append(runner)
            if pod.bootstrap is not None:
                bootstrap = web.AppRunner(pod.bootstrap.app(), access_log=None, handle_signals=False)
                await bootstrap.setup()
                await web.TCPSite(bootstrap, pod.spec.host, pod.spec.bootstrap_port, reuse_address=True).start()
                runners.append(bootstrap)
            log.info("pod %s (%s) serving on %s:%d", pod.spec.name, pod.spec.runtime, pod.spec.host, pod.spec.port)
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()
        for pod in pods:
            if pod.receiver is not None:
                await pod.receiver.close()
            if pod.events is not None:
                await pod.events.close()
        for task in engines:
            task.cancel()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s %(message)s")
    physics = Physics(**{f.name: getattr(args, f.name) for f in fields(Physics)})
    if args.lora_modules and not args.enable_lora:
        build_parser().error("--lora-modules needs --enable-lora")
    try:
        kv_events = KvEventsConfig.parse(args.kv_events_config, args.runtime) if args.kv_events_config else None
    except (ValueError, TypeError) as exc:
        build_parser().error(f"--kv-events-config: {exc}")
    if args.tokenizer is not None:
        tokenizer.use(args.tokenizer)
    tokenizer.model()  # loaded before the pods serve: a tenth of a second, once
    pods = [SimulatedPod(PodSpec(name, host, port, args.runtime, args.model, enable_lora=args.enable_lora,
                                 lora_modules=tuple(args.lora_modules), max_loras=args.max_loras,
                                 max_cpu_loras=args.max_cpu_loras,
                                 disaggregation=args.disaggregation_mode,
                                 bootstrap_port=args.disaggregation_bootstrap_port,
                                 bootstrap_timeout_s=args.bootstrap_timeout_s, kv_events=kv_events,
                                 kv_events_encoding=args.kv_events_encoding,
                                 data_parallel_rank=args.data_parallel_rank,
                                 hash_algorithm=args.prefix_caching_hash_algo), physics)
            for name, host, port in args.pod]
    asyncio.run(serve(pods))


if __name__ == "__main__":
    main()
