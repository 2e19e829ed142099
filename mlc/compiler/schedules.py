"""Device schedules per target and opt level."""

from __future__ import annotations

from mlc.compiler.target import DeviceTarget


def passes(dev: DeviceTarget, opt: str) -> list:
    """The scheduling passes for a device: dlight on GPUs, `cpu_schedules` on CPUs."""
    if not dev.is_gpu:
        from mlc.compiler import cpu_schedules

        return cpu_schedules.passes(opt)
    from tvm.s_tir import dlight as dl

    return [dl.ApplyDefaultSchedule(
        dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(4), dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(), dl.gpu.Fallback())]
