"""A model's own tokenizer and chat template, read from its GGUF file: the token ids an engine computes."""
