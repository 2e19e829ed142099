"""Versions that key caches: bump LIBRARY_VERSION whenever generated code changes."""

LIBRARY_VERSION = "mlc-0.1.0/tvm-0.27/lib-4"   # lib-4: CPU q4f16_1 libraries compute in float32
