"""The CUDA arch string for a compute capability (shared by compile targets and the runtime)."""


def arch_for_compute_capability(version: str) -> str:
    """"9.0" -> "sm_90a" (Hopper's arch-specific features), "8.0" -> "sm_80"."""
    major, minor = version.strip().split(".")
    return f"sm_{major}{minor}" + ("a" if major == "9" else "")
