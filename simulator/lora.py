"""LoRA adapters as vLLM serves them (`--enable-lora --max-loras N --max-cpu-loras M --lora-modules name=path`).

A running batch holds at most `max_loras` distinct adapters: a waiting request
for another adapter waits while every slot is taken by running requests. An
adapter joins a batch from the CPU cache (an LRU of `max_cpu_loras` adapters)
at a small cost, or from disk at a larger one, and the step that first runs it
pays that cost, as vLLM's model runner loads adapters before the forward pass.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


class AdapterError(Exception):
    """A load or unload vLLM refuses: the message is its answer."""


@dataclass
class Adapters:
    max_loras: int
    max_cpu_loras: int
    load_s: float  # disk to CPU: reading the weights (tens of MB at rank 16)
    activate_s: float  # CPU to a GPU slot
    paths: dict[str, str] = field(default_factory=dict)  # served adapters: name -> path
    _gpu: OrderedDict[str, None] = field(default_factory=OrderedDict)  # LRU, most recent last
    _cpu: OrderedDict[str, None] = field(default_factory=OrderedDict)
    loads: int = 0  # adapters read from disk
    activations: int = 0  # adapters put in a GPU slot

    def __post_init__(self) -> None:
        if self.max_loras < 1 or self.max_cpu_loras < self.max_loras:
            raise ValueError("max_loras must be at least 1 and max_cpu_loras at least max_loras")

    def admits(self, adapter: str | None, running: set[str]) -> bool:
        """Whether a request for `adapter` may join a batch whose running requests use `running`."""
        return adapter is None or adapter in running or len(running) < self.max_loras

    def use(self, adapter: str) -> float:
        """The adapter joins the batch now; returns the seconds its loading adds to the step."""
        cost = 0.0
        if adapter not in self._gpu:
            if adapter not in self._cpu:
                cost += self.load_s
                self.loads += 1
            self._cpu[adapter] = None
            cost += self.activate_s
            self.activations += 1
        self._gpu[adapter] = None
        self._gpu.move_to_end(adapter)
        self._cpu.move_to_end(adapter)
        while len(self._gpu) > self.max_loras:
            self._gpu.popitem(last=False)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)
        return cost

    @property
    def resident(self) -> list[str]:
        """Adapters in GPU slots, least recently used first."""
        return list(self._gpu)

    def add(self, name: str, path: str) -> None:
        if not name or not path:
            raise AdapterError("Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.paths:
            raise AdapterError(f"The lora adapter '{name}' has already been loaded.")
        self.paths[name] = path

    def remove(self, name: str) -> None:
        if name not in self.paths:
            raise AdapterError(f"The lora adapter '{name}' cannot be found.")
        del self.paths[name]
        self._gpu.pop(name, None)
        self._cpu.pop(name, None)
