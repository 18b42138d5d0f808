"""Real infrastructure for the tests and benchmarks, built from Go modules and run locally.

`build` compiles the Go programs in `testbed/go/` into a per-user cache keyed by
their module files; `kube` runs etcd and kube-apiserver as envtest does.
"""
