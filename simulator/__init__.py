"""A model-server simulator that speaks vLLM's and SGLang's HTTP APIs and metrics
and schedules requests with vLLM's physics (see docs/simulator.md)."""
