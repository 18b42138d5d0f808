"""Controller: turns InferencePool/InferenceModel/Gateway/HTTPRoute manifests into Redis records and Envoy config."""
