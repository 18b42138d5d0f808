"""Picker: Envoy ext_proc server that picks the model-server endpoint for each request."""
