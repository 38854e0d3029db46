"""Helpers the tests import by name: runs (the repository, the offline environment, run_script), texts,
models (the unit tests' tiny Llama) and fake_hub (a Hugging Face Hub that records and fails on demand)."""
