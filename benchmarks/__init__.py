"""Benchmarks of the pipeline against bare PyTorch and pyarrow baselines; `python -m benchmarks.run` runs them."""
