"""The GPU check: correctness on the device, the load scenarios, and what ``--workers`` costs.

Run it through ``scripts/gpu_check.sh`` (which installs onnxruntime-gpu where
needed) or directly with ``python -m load_tests.gpu [--cpu] [--quick]``; see
docs/gpu.md.
"""
