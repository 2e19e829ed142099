"""Versions that key caches: bump LIBRARY_VERSION whenever generated code changes."""

# lib-5: hidden-state functions (embeddings, EAGLE); CPU q4f16_1 libraries compute in float32
LIBRARY_VERSION = "mlc-0.1.0/tvm-0.27/lib-5"
