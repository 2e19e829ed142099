"""Device schedules per target and opt level."""

from __future__ import annotations

from mlc.compiler.target import DeviceTarget


def passes(dev: DeviceTarget, opt: str, sliding_window: int = 0) -> list:
    """The scheduling passes for a device: dlight on GPUs, `cpu_schedules` on CPUs (whose
    attention kernels need the model's sliding window size, or 0)."""
    if not dev.is_gpu:
        from mlc.compiler import cpu_schedules

        return cpu_schedules.passes(opt, sliding_window)
    from tvm.s_tir import dlight as dl

    return [dl.ApplyDefaultSchedule(
        dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(4), dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
