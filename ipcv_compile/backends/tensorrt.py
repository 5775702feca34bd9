"""``tensorrt``: torch-tensorrt's dynamo path, one engine per static input shape.

Why static shapes: TensorRT's TopK needs a constant ``k`` (``<= 3840``), and IPCV's keep count
``K = ceil(r * n)`` follows the token count, so each token count gets its own engine (the rewrite
never sorts the full token list, so no TopK ever spans more than a segment's ``K``).  Per shape:

1. ``torch.export`` with static shapes;
2. :func:`~ipcv_compile.tensorrt_check.prepare_for_tensorrt` (decompose ``baddbmm``, which has no
   converter) and :func:`~ipcv_compile.tensorrt_check.tensorrt_check` (refuses data-dependent
   shapes, ``torch.cond``, large / dynamic TopK, reducing scatters, ops without converters);
3. ``torch_tensorrt.dynamo.compile(exported_program, arg_inputs=..., min_block_size=1,
   require_full_compilation=True)`` — torch-tensorrt 2.13 builds strongly typed engines (the
   model's dtype; cast the model to bf16 / fp16 before rewriting, or pass ``precision=`` to use its
   autocast); older releases get ``enabled_precisions={precision}``.

Engines are built on first use of a shape (or up front with ``shapes=``) and cached.  Needs
torch-tensorrt (a CUDA build of torch) and a CUDA device; without them :class:`BackendUnavailable`
says so.  Not run in this project's CI (no GPU): the graph-level conditions are checked by
``tensorrt_check`` in CI instead.
"""

from __future__ import annotations

import inspect
import threading
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .common import BackendUnavailable, Lowered, LoweringError, default_artifact_path, export_program, graph_of
from ..tensorrt_check import prepare_for_tensorrt, tensorrt_check


def _import_torch_tensorrt(require_cuda: bool = True):
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(
            "the tensorrt backend needs torch-tensorrt, which is not installed (it requires a CUDA build of "
            "torch: pip install torch-tensorrt matching your torch version, e.g. pip install 'ipcv[tensorrt]' on a "
            "CUDA machine). Other backends: eager, inductor, onnx, pt2."
        ) from e
    if require_cuda and not torch.cuda.is_available():
        raise BackendUnavailable("the tensorrt backend needs a CUDA device (torch.cuda.is_available() is False)")
    return torch_tensorrt


def _shape_key(args) -> Tuple:
    return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else ("const", repr(a)) for a in args)


class TensorRTEngines:
    """TensorRT modules keyed by static input shapes; called like the original module.

    ``build_on_demand=False`` makes an unseen shape an error instead of a (slow) engine build.
    """

    def __init__(self, module, *, precision: Optional[torch.dtype] = None, check: bool = True,
                 build_on_demand: bool = True, compile_options: Optional[Dict[str, Any]] = None, device: str = "cuda"):
        self.module = module
        self.device = torch.device(device)
        self.precision = precision
        self.check = check
        self.build_on_demand = build_on_demand
        self.compile_options = dict(compile_options or {})
        self.engines: Dict[Tuple, Any] = {}
        self.reports: Dict[Tuple, Any] = {}
        self.build_seconds: Dict[Tuple, float] = {}
        self._lock = threading.Lock()

    def _to_cuda(self, args):
        return tuple(a.to(self.device) if isinstance(a, torch.Tensor) else a for a in args)

    def build(self, args: Sequence[Any]):
        """Build (or return) the engine for the shapes of ``args``."""
        torch_tensorrt = _import_torch_tensorrt(self.device.type == "cuda")
        key = _shape_key(args)
        with self._lock:
            if key in self.engines:
                return self.engines[key]
            t0 = time.perf_counter()
            args = self._to_cuda(args)
            p = next(iter(graph_of(self.module).parameters()), None)
            if p is not None and p.device.type != self.device.type:
                raise LoweringError("the tensorrt backend needs the model on CUDA: move the model to the GPU (and "
                                    "dtype) first, then rewrite it there — rewritten graphs keep the device they were "
                                    "captured on")
            ep = export_program(self.module, args, dynamic=False)
            ep = prepare_for_tensorrt(ep)
            if self.check:
                report = tensorrt_check(ep)
                self.reports[key] = report
                if not report.ok:
                    raise LoweringError("the graph cannot be converted to TensorRT as it is:\n" + report.format())
            compile_fn = torch_tensorrt.dynamo.compile
            params = inspect.signature(compile_fn).parameters
            opts: Dict[str, Any] = dict(min_block_size=1, require_full_compilation=True)
            model_dtype = p.dtype if p is not None else torch.float32
            if self.precision is not None and "enabled_precisions" in params:  # torch-tensorrt < 2.10
                opts["enabled_precisions"] = {self.precision}
            elif self.precision is not None and self.precision != model_dtype:
                # 2.13 builds strongly typed engines (precision = the graph's dtypes); lower precision
                # for an fp32 graph goes through its autocast
                if "enable_autocast" not in params:
                    raise LoweringError(f"this torch-tensorrt cannot lower {model_dtype} to {self.precision}: cast the "
                                        "model first")
                opts.update(enable_autocast=True, autocast_low_precision_type=self.precision)
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if "arg_inputs" in params:
                opts["arg_inputs"] = tensors
            else:  # older torch-tensorrt
                opts["inputs"] = tensors
            opts = {k: v for k, v in opts.items() if k in params}
            opts.update(self.compile_options)
            try:
                trt_module = compile_fn(ep, **opts)
            except Exception as e:
                raise LoweringError(f"torch_tensorrt.dynamo.compile failed: {type(e).__name__}: {e}") from e
            self.engines[key] = trt_module
            self.build_seconds[key] = time.perf_counter() - t0
            return trt_module

    def __call__(self, *args):
        key = _shape_key(args)
        eng = self.engines.get(key)
        if eng is None:
            if not self.build_on_demand:
                raise LoweringError(f"no TensorRT engine for input shapes {key}; built: {list(self.engines)}")
            eng = self.build(args)
        return eng(*self._to_cuda(args))

    def save(self, path: str, args: Sequence[Any]) -> str:
        """Save the engine for ``args``' shapes with ``torch_tensorrt.save`` (an ExportedProgram
        archive holding the serialized engine; reload with ``torch.export.load(path).module()`` after
        ``import torch_tensorrt``)."""
        torch_tensorrt = _import_torch_tensorrt(self.device.type == "cuda")
        eng = self.build(args)
        tensors = [a for a in self._to_cuda(args) if isinstance(a, torch.Tensor)]
        params = inspect.signature(torch_tensorrt.save).parameters
        kw = {"arg_inputs": tensors} if "arg_inputs" in params else {"inputs": tensors}
        torch_tensorrt.save(eng, path, output_format="exported_program", **kw)
        return path


def lower_tensorrt(module, example_inputs, *, example_kwargs=None, path=None, dynamic=True, dynamic_shapes=None,
                   precision: Optional[torch.dtype] = None, check: bool = True, shapes: Sequence[Sequence[Any]] = (),
                   save: bool = False, build_on_demand: bool = True, device: str = "cuda", **compile_options):
    """Build TensorRT engines for ``example_inputs`` (and each input tuple in ``shapes``).

    ``dynamic`` / ``dynamic_shapes`` are ignored: every engine has static shapes.  ``save=True``
    writes the example's engine to ``path`` (``.ep``).  Extra keyword arguments go to
    ``torch_tensorrt.dynamo.compile`` (e.g. ``workspace_size``, ``use_fp32_acc``).
    """
    if example_kwargs:
        raise LoweringError("tensorrt backend: pass inputs positionally (example_kwargs are not supported)")
    _import_torch_tensorrt(torch.device(device).type == "cuda")
    engines = TensorRTEngines(module, precision=precision, check=check, build_on_demand=build_on_demand,
                              compile_options=compile_options, device=device)
    for args in (tuple(example_inputs), *[tuple(s) for s in shapes]):
        engines.build(args)
    artifact = None
    if save:
        artifact = engines.save(path or default_artifact_path("tensorrt", ".ep"), example_inputs)
    return Lowered("tensorrt", engines, artifact=artifact,
                   info={"engines": len(engines.engines), "build_s": dict(engines.build_seconds),
                         "precision": str(precision), "dynamic_ignored": bool(dynamic)})


__all__ = ["lower_tensorrt", "TensorRTEngines"]

