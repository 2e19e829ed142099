"""`mlc bench`'s measurements (not part of the runtime): a model library's prefill / decode
throughput (`model_bench`), the transformers baseline (`transformers_bench`), and a per-call
VM profiler used by the scripts in bench/."""
