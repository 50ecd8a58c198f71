"""`nabla bench`: prefill and decode speed against the machine's memory limit and against peers.

machine.py probes the machine, timing.py times nabla, peers.py (and
llamacpp.py) build and time transformers and llama.cpp on the same weights,
runner.py puts one run together and reports it.

Leaves out: serving throughput under load (benchmarks/bench_server.py) and
output quality (benchmarks/bench_quant_quality.py).
"""

from nabla.bench.runner import Setup, format_report, run

__all__ = ["Setup", "format_report", "run"]
