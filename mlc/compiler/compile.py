"""`mlc compile`: an MLC model dir -> a device library (.so) with the library contract.

The pipeline is one list of passes in phases (see `build_pipeline`); the library carries a
`_metadata` function (JSON) that ties it to the weights it was built for.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlc.compiler.target import DeviceTarget, parse_device
from mlc.errors import CompileError, MLCError
from mlc.support.chat_config import ChatConfig
from mlc.support.cpu_info import describe_cpu_target
from mlc.support.versions import LIBRARY_VERSION as COMPILER_VERSION

logger = logging.getLogger(__name__)

OPT_LEVELS = {
    "O0": "no schedules beyond what the target needs to run (debugging)",
    "O1": "fusion + FuseTransposeMatmul + default schedules",
    "O2": "O1 + tuned GEMV/attention schedules and CUDA graphs on GPUs (default)",
    "O3": "O2 (reserved for tuning that takes minutes, cached)",
}
OVERRIDABLE = ("context_window_size", "prefill_chunk_size", "max_batch_size",
               "sliding_window_size", "tensor_parallel_shards")


@dataclass
class CompileResult:
    path: Path
    device: str
    seconds: float
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_overrides(text: str | None) -> dict[str, int]:
    """`"context_window_size=4096;prefill_chunk_size=1024"` -> dict, validating keys."""
    out: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in (text or "").split(";"))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in OVERRIDABLE:
            raise CompileError(f"Bad override {item!r}: use KEY=INT;... with KEY one of "
                               f"{', '.join(OVERRIDABLE)}.", param="overrides")
        try:
            out[key] = int(value)
        except ValueError:
            raise CompileError(f"Override {key} needs an integer, got {value!r}.",
                               param="overrides") from None
    return out


def model_config_for(chat: ChatConfig, overrides: dict[str, int]):
    """The architecture config a library is built for: the chat config plus overrides."""
    from mlc.models.registry import get_model

    data = {**chat.model_config,
            "context_window_size": chat.context_window_size,
            "prefill_chunk_size": chat.prefill_chunk_size,
            "sliding_window_size": chat.sliding_window_size, **overrides}
    return get_model(chat.model_type).config_from_dict(data)


def build_pipeline(dev: DeviceTarget, opt: str, sliding_window: int = 0, last_phase: int = 5):
    """All passes from the exported IRModule to VM-ready code, in phases. `sliding_window` is
    the layer window the model's KV cache was built with (`kv_cache_window`); `last_phase`
    stops earlier (4: the scheduled TIR, for inspection)."""
    import tvm
    from tvm import relax

    from mlc.compiler import schedules

    target = dev.tvm_target()
    phases = [
        # phase 1: graph rewrites on Relax
        [relax.transform.FuseTransposeMatmul()] if opt != "O0" else [],
        # phase 2: library dispatch (sampling, sort/scan kernels)
        [relax.backend.DispatchSampling(), relax.backend.DispatchSortScan()],
        # phase 3: lower Relax ops to TIR and fuse
        [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
         relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR(),
         relax.transform.DeadCodeElimination()],
        # phase 4: device schedules
        schedules.passes(dev, opt, sliding_window),
        # phase 5: memory planning and VM lowering
        [relax.transform.RewriteDataflowReshape(), relax.transform.ToNonDataflow(),
         relax.transform.RemovePurityChecking(), relax.transform.CallTIRRewrite(),
         relax.transform.StaticPlanBlockMemory()]
        + ([relax.transform.RewriteCUDAGraph()] if dev.kind == "cuda" else [])
        + [relax.transform.LowerAllocTensor(), relax.transform.KillAfterLastUse(),
           relax.transform.LowerRuntimeBuiltin(), relax.transform.ComputePrimValue(),
           relax.transform.VMShapeLower(), relax.transform.AttachGlobalSymbol()],
    ]
    dump = os.environ.get("MLC_DUMP_IR")

    @tvm.transform.module_pass(opt_level=0, name="mlc_pipeline")
    def _pipeline(mod, _ctx):
        with target:
            for i, phase in enumerate(phases[:last_phase]):
                mod = tvm.transform.Sequential(phase)(mod)
                if dump:
                    Path(dump).mkdir(parents=True, exist_ok=True)
                    Path(dump, f"phase{i + 1}.py").write_text(mod.script())
        return mod

    return _pipeline


def _activation_bytes(config, dtype_bytes: int) -> int:
    """A planning estimate of the largest live activations of a prefill chunk (bytes)."""
    per_token = config.activation_bytes_per_token()
    logits = config.max_batch_size * config.vocab_size * 4 * 2
    return config.prefill_chunk_size * per_token * max(dtype_bytes, 4) + logits


def library_metadata(chat: ChatConfig, config, quantization, named_params, dev: DeviceTarget,
                     opt: str) -> dict[str, Any]:
    """What `_metadata` returns: enough to refuse a library that does not fit its weights.
    Reads only the fields every architecture's config has (`mlc.models.config.ModelConfig`)."""
    from mlc.models.common import PAGE_SIZE, cache_attention_kinds

    dtype_bytes = 2 if quantization.model_dtype == "float16" else 4
    shards = config.tensor_parallel_shards
    kinds = cache_attention_kinds(config.attention_kinds())
    return {
        "model_type": chat.model_type, "quantization": quantization.name,
        "context_window_size": config.context_window_size,
        "prefill_chunk_size": config.prefill_chunk_size,
        "sliding_window_size": config.sliding_window_size,
        "max_batch_size": config.max_batch_size,
        "tensor_parallel_shards": shards,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "model_dtype": quantization.model_dtype,
        # the cache as built (an unused extra layer included): what its pages cost
        "kv_cache": {"num_hidden_layers": len(kinds),
                     "num_key_value_heads": config.num_key_value_heads,
                     "head_dim": config.head_dim, "page_size": PAGE_SIZE,
                     "dtype": quantization.model_dtype,
                     "sliding_layers": sum(k == "mha_sliding" for k in kinds)},
        "params": [{"name": n, "shape": [int(s) for s in p.shape], "dtype": p.dtype}
                   for n, p in named_params],
        "activation_bytes": _activation_bytes(config, dtype_bytes),
        "device": dev.device, "opt": opt, "compiler_version": COMPILER_VERSION,
        **({"cpu": describe_cpu_target(dev.tvm_target())} if dev.kind == "cpu" else {}),
    }


def _attach_metadata(mod, metadata: dict[str, Any]):
    import tvm
    from tvm import relax as rx

    func = rx.Function([], tvm.ir.StringImm(json.dumps(metadata)), is_pure=True)
    mod["_metadata"] = func.with_attr("global_symbol", "_metadata")
    return mod


def _attach_shape_bounds(mod, config):
    """Upper bounds of symbolic sizes, so memory is planned statically (no per-call allocs)."""
    bounds = {"seq_len": config.prefill_chunk_size, "batch_size": config.max_batch_size}
    for gv, func in list(mod.functions.items()):
        if hasattr(func, "params") and "relax" in type(func).__module__:
            mod[gv] = func.with_attr("tir_var_upper_bound", bounds)
    return mod


# function -> the symbolic shape variable its CUDA graphs are keyed by
CAPTURED_FUNCTIONS = {"batch_decode": "batch_size", "batch_verify": "seq_len"}


def _capture_batch_decode(mod):
    """CUDA graphs for batched decode and for speculative verification too: RewriteCUDAGraph
    captures the regions whose shapes depend on the batch size (or the verified token count),
    and the runtime keeps one graph per size it meets (a step otherwise pays ~15 kernel
    launches per layer from the host: a verify call of 2 tokens cost 1.6 decode steps)."""
    for gv, func in list(mod.functions.items()):
        if gv.name_hint in CAPTURED_FUNCTIONS:
            mod[gv] = func.with_attr("relax.rewrite_cuda_graph.capture_symbolic_vars",
                                     [CAPTURED_FUNCTIONS[gv.name_hint]])
    return mod


def compile_model(model_dir: str | Path, device: str, output: str | Path,
                  quantization: str | None = None, opt: str = "O2",
                  overrides: dict[str, int] | str | None = None, quiet: bool = False,
                  ) -> CompileResult:
    """Build the device library for an MLC model dir; write it atomically to `output`."""
    from mlc.compiler.quantization import get_quantization
    from mlc.models.registry import get_model

    start = time.perf_counter()
    if opt not in OPT_LEVELS:
        raise CompileError(f"Unknown --opt {opt!r}; use one of {', '.join(OPT_LEVELS)}.",
                           param="opt")
    if isinstance(overrides, str) or overrides is None:
        overrides = parse_overrides(overrides)
    chat = ChatConfig.load(model_dir)
    if quantization and quantization != chat.quantization:
        raise CompileError(
            f"{model_dir} holds {chat.quantization} weights but --quantization {quantization} "
            f"was asked: drop --quantization, or convert again with "
            f"`mlc convert ... --quantization {quantization}`.", param="quantization")
    q = get_quantization(chat.quantization)
    dev = parse_device(device)
    _check_output_form(dev, Path(output))
    config = model_config_for(chat, overrides)
    info = get_model(chat.model_type)
    _say(quiet, f"compiling {chat.model_type} {q.name} for {dev.device} ({opt}) ...")
    if dev.kind == "cpu":
        cpu = describe_cpu_target(dev.tvm_target())
        _say(quiet, f"  host CPU: {cpu['cpu_model']}; code for -mcpu={cpu['mcpu']} "
                    f"({' '.join(cpu['features']) or 'baseline x86-64'})")
    try:
        lib = build_library(info, config, chat, q, dev, opt)
    except MLCError:
        raise
    except Exception as e:  # TVM errors are long C++ traces: summarize and point at the fix
        raise CompileError(
            f"TVM failed to build {chat.model_type}/{q.name} for {dev.device}: "
            f"{str(e).strip().splitlines()[-1][:500]}. Re-run with MLC_DUMP_IR=DIR to see the IR "
            f"after each phase, or try --opt O0.") from e
    ex, metadata = lib
    path = write_library(ex, Path(output), dev)
    seconds = time.perf_counter() - start
    _say(quiet, f"wrote {path} in {seconds:.1f} s")
    return CompileResult(path, dev.device, seconds, metadata)


def compute_quantization(quantization, dev: DeviceTarget):
    """The scheme a library computes in: the stored one, except that a CPU library of a
    float16 group-quantized model (q4f16_1) computes in float32. x86 CPUs have no float16
    arithmetic LLVM uses for these kernels (F16C only converts), so every float16 operation
    becomes convert, operate, round: decode ran 2.7x slower than q4f32_1 (bench/NOTES.md).
    The float32 library takes float32 scales and norms, which the loader widens once from
    the file's float16 (`mlc.runtime.model.WIDENED_AT_LOAD`): the files stay MLC-LLM's, and
    the kernels are q4f32_1's. GPU libraries keep float16."""
    import dataclasses

    if dev.kind == "cpu" and quantization.is_quantized and quantization.model_dtype == "float16":
        return dataclasses.replace(quantization, model_dtype="float32")
    return quantization


def build_library(info, config, chat, quantization, dev: DeviceTarget, opt: str):
    """Export the nn.Module, run the pipeline, build. Returns (executable, metadata)."""
    import tvm
    from tvm import relax

    from mlc.models.common import kv_cache_window

    mod, metadata = export_module(info, config, chat, quantization, dev, opt)
    cuda_graphs = dev.kind == "cuda" and opt in ("O2", "O3")
    pipeline = build_pipeline(dev, opt, kv_cache_window(config.sliding_window_size))
    with tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": cuda_graphs}):
        ex = relax.build(mod, dev.tvm_target(), relax_pipeline=pipeline)
    return ex, metadata


def export_module(info, config, chat, quantization, dev: DeviceTarget, opt: str):
    """The model's Relax IRModule as the pipeline takes it, and the library's metadata."""
    from mlc.compiler import cuda_support
    from mlc.models.layers import extern_cuda_kernels

    quantization = compute_quantization(quantization, dev)
    target = dev.tvm_target()
    model = info.build(config, quantization)
    names = cuda_support.kernel_function if cuda_support.cuda_kernels_enabled(dev) else None
    with target, extern_cuda_kernels(names):
        mod, named_params = model.export_tvm(spec=model.get_default_spec(target.kind.name))
    metadata = library_metadata(chat, config, quantization, named_params, dev, opt)
    mod = _attach_shape_bounds(mod, config)
    mod = _attach_metadata(mod, metadata)
    if _uses_mlc_attention(dev, config, quantization):
        from mlc.compiler import cuda_attention

        mod = cuda_attention.use_mlc_attention()(mod)
    # CUDA graphs: RewriteCUDAGraph captures the static-shape regions (batch-1 decode) so a
    # token costs a few graph launches per layer instead of ~15 kernel launches.
    if dev.kind == "cuda" and opt in ("O2", "O3"):
        mod = _capture_batch_decode(mod)
    return mod, metadata


def _uses_mlc_attention(dev: DeviceTarget, config, quantization) -> bool:
    from mlc.compiler import cuda_attention, cuda_support

    return (cuda_support.cuda_kernels_enabled(dev)
            and cuda_attention.attention_enabled(quantization.model_dtype, config.head_dim,
                                                 config.sliding_window_size))


def _check_output_form(dev: DeviceTarget, output: Path) -> None:
    """WebGPU code links into a .wasm only with emscripten (absent from the PyPI wheel's
    toolchain); without it the wheel writes a .tar of the wasm32 objects (host code + WGSL)."""
    if dev.kind != "webgpu" or output.suffix == ".tar":
        return
    if output.suffix == ".wasm" and shutil.which("emcc"):
        return
    raise CompileError(
        f"WebGPU output {output.name!r}: a WebGPU library is a .wasm linked by emscripten "
        f"({'emcc is not installed' if output.suffix == '.wasm' else 'not a .so'}). "
        f"Use -o {output.with_suffix('.tar').name} for the unlinked wasm32 objects with the "
        "WGSL shaders, or install emscripten (emsdk) and use -o NAME.wasm.", param="output")


def write_library(ex, output: Path, dev: DeviceTarget) -> Path:
    """Export a built executable as `output` (atomically), with mlc's CUDA kernels and the
    cubin of TVM's own kernels linked in for a CUDA target."""
    output = output.resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    # export_library picks the linker by suffix (.so: cc, .tar: tar, .wasm: emscripten)
    suffix = ".tmp" + (output.suffix if output.suffix in (".tar", ".wasm") else ".so")
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=suffix, dir=output.parent)
    os.close(fd)
    try:
        from mlc.compiler import cuda_support

        with cuda_support.precompiled_cuda(dev, ex) as extra:
            ex.export_library(tmp, **extra)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return output


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, flush=True)
