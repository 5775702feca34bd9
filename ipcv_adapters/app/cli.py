"""``ipcv`` command line: export / inspect / check IPCV-rewritten vision towers.

    ipcv export MODEL --retain 0.35 --format onnx|trt|pt2 --out PATH [--image-size 448] [--batch 2]
                      [--config tuned.json] [--grid 1,16,16 ...] [--no-verify]
    ipcv inspect MODEL --retain 0.35        # adapter, IPCV config, per-block rows for the example
    ipcv trt-check MODEL --retain 0.35      # will torch-tensorrt convert it? (no GPU needed)
    ipcv demo [demo args]                   # = python -m ipcv_adapters.app.demo

MODEL: ``tiny:<family>`` (random weights from a small config, 4 blocks, for trying things out):
``tiny:qwen2-vl``, ``tiny:qwen2.5-vl``, ``tiny:qwen3-vl``, ``tiny:qwen3.5``, ``tiny:internvl``,
``tiny:dinov2``, ``tiny:siglip``, ``tiny:clip``, ``tiny:llava`` (the CLIP tower of a tiny LLaVA),
``tiny:llava-onevision`` (its SigLIP tower); or a local folder / hub id of a checkpoint of any tower
the adapter registry supports, or of a VLM holding one (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5,
InternVL (HF-native ``*-hf``), LLaVA, LLaVA-OneVision, ...): its vision tower is used
(:func:`ipcv_adapters.loading.load_tower`).

What is exported: the whole vision tower with IPCV inside (patch embedding -> rewritten blocks ->
final norm / merger), returning ``(last_hidden_state[, pooler_output])`` (the ONNX outputs carry
these names).  Batched towers (DINOv2, InternVL tiles, SigLIP, CLIP) keep a dynamic batch, and a
dynamic image size when the tower interpolates its position table (DINOv2, InternVL; SigLIP / CLIP
files are for their native size; grid-aware ``--config`` variants for the example's size).  The Qwen
family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) packs images into one sequence whose per-image keep counts are baked into the graph: the file is for
one ``--grid`` layout, recorded in the file; ``ipcv_compile.backends.artifacts.load_artifact`` refuses another.

A JSON sidecar ``PATH.json`` records the model, IPCV config, inputs, dynamic dims (by name:
batch / height / width), the fixed layout and outputs.
Exit codes: 0 ok, 2 usage error (unknown model / format / bad option or IPCV config), 3 backend
unavailable (onnx / onnxscript / onnxruntime for ``--format onnx``, torch-tensorrt for ``trt``: checked
before the model is loaded or captured; ``trt`` still runs its GPU-free graph check first), 4 export /
verification failed.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import loading
from ..loading import ModelLoadError, allowed_models

FORMATS = {"onnx": "onnx", "pt2": "pt2", "trt": "tensorrt"}
#: the Python modules each backend needs, and the extra that installs them (checked before any capture)
BACKEND_MODULES = {"onnx": (("onnx", "onnxscript", "onnxruntime"), "pip install 'ipcv[onnx]'"),
                   "pt2": ((), ""),
                   "tensorrt": (("torch_tensorrt",), "pip install 'ipcv[tensorrt]' (torch-tensorrt; needs a CUDA build of torch)")}
EXIT_USAGE, EXIT_BACKEND, EXIT_FAILED = 2, 3, 4
VERIFY_TOL = 1e-4  # relative (max-abs error / max-abs reference), fp32


class CLIError(Exception):
    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


class Progress:
    """Step messages with elapsed time on stderr (``[2/5] exporting ... done in 12.3 s``)."""

    def __init__(self, total: int, quiet: bool = False):
        self.total, self.i, self.quiet = total, 0, quiet
        self._t = None

    def start(self, msg: str):
        self.i += 1
        self._t = time.perf_counter()
        if not self.quiet:
            print(f"[{self.i}/{self.total}] {msg} ...", file=sys.stderr, flush=True)

    def done(self, extra: str = ""):
        if not self.quiet:
            dt = time.perf_counter() - self._t
            print(f"      done in {dt:.1f} s{(' — ' + extra) if extra else ''}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- models
def load_tower(model: str):
    """:func:`ipcv_adapters.loading.load_tower`, with its errors as usage errors (exit code 2)."""
    try:
        return loading.load_tower(model)
    except ModelLoadError as e:
        raise CLIError(str(e)) from e


def ipcv_config(args, kind: str):
    """The IPCV config of the command: ``--config`` (a JSON file from ``ipcv tune``) or the defaults
    (tiny models: ``l_p=1, Δ=2, k=4``), with the options given on the command line on top."""
    from ipcv_core import IPCVConfig

    if getattr(args, "config", None):
        try:
            base = IPCVConfig.from_json(args.config)
        except (OSError, ValueError, TypeError) as e:
            raise CLIError(f"--config {args.config}: {e}")
    elif kind == "tiny":
        from ipcv_adapters.testing import TINY_IPCV

        base = TINY_IPCV
    else:
        base = IPCVConfig()
    changes = {}
    for opt, fld in (("retain", "retain"), ("prune_layer", "prune_layer"), ("as_depth", "as_depth"), ("k", "k")):
        v = getattr(args, opt, None)
        if v is not None:
            changes[fld] = v
    try:
        return base.replace(**changes)
    except Exception as e:
        raise CLIError(f"invalid IPCV option: {e}")


def rewrite_tower(tower, cfg):
    """``ipcv_compile.rewrite`` with a config that does not fit the tower (e.g. ``--prune-layer`` past
    its depth) as a usage error (exit code 2)."""
    import ipcv_compile

    try:
        return ipcv_compile.rewrite(tower, cfg)
    except ValueError as e:
        raise CLIError(f"invalid IPCV config for {type(tower).__name__}: {e}")


def _parse_grid(s: str) -> List[int]:
    try:
        t, h, w = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--grid wants T,H,W (patches), got {s!r}")
    return [t, h, w]


def example_call(tower, rt, args, kind: str):
    """``(example pixel input, fixed keyword inputs, description dict)`` for a call of the tower:
    packed towers (the Qwen family) get a ``grid_thw`` layout (``--grid``), batched ones a batch of
    ``--image-size`` images."""
    import torch

    ad = rt.adapter
    gen = torch.Generator().manual_seed(0)
    cfg = tower.config
    if ad.packed:
        merge = int(getattr(cfg, "spatial_merge_size", 1))
        grids = args.grid or ([[1, 4, 6], [1, 4, 4]] if kind == "tiny" else [[1, 32, 32]])
        for t, h, w in grids:
            if min(t, h, w) < 1 or h % merge or w % merge:
                raise CLIError(f"--grid {t},{h},{w}: T, H, W must be >= 1 and H, W multiples of "
                               f"spatial_merge_size={merge}")
        thw = torch.tensor(grids, dtype=torch.long)
        n = int(sum(t * h * w for t, h, w in grids))
        dim = int(getattr(cfg, "in_channels", 3)) * int(cfg.temporal_patch_size) * int(cfg.patch_size) ** 2
        x = torch.randn(n, dim, generator=gen)
        return x, {"grid_thw": thw}, {"pixel_values": [n, dim], "grid_thw (baked in)": grids}
    native = _first(getattr(cfg, "image_size", 224))
    size = args.image_size or native
    patch = _first(getattr(cfg, "patch_size", 14))
    if size % patch:
        raise CLIError(f"--image-size {size} must be a multiple of the patch size {patch}")
    x = torch.randn(args.batch, int(getattr(cfg, "num_channels", 3)), size, size, generator=gen)
    fixed = {}
    if size != native and "interpolate_pos_encoding" in inspect.signature(rt.adapter.prepare).parameters:
        fixed["interpolate_pos_encoding"] = True  # SigLIP / CLIP: other sizes only by interpolation
    return x, fixed, {"pixel_values": list(x.shape), **({"fixed": fixed} if fixed else {})}


def example_inputs(tower, rt, args, kind: str):
    """``(export module, example pixel input, description dict)`` for the tower."""
    import torch

    from ipcv_adapters.export import TowerForExport

    x, fixed, desc = example_call(tower, rt, args, kind)
    try:
        mod = TowerForExport(rt, (x,), fixed)
        with torch.no_grad():
            mod(x)
    except (ValueError, RuntimeError, NotImplementedError) as e:
        what = f"the layout {desc.get('grid_thw (baked in)')}" if rt.adapter.packed else f"a {x.shape[-1]} px image"
        raise CLIError(f"{type(tower).__name__} cannot run {what}: {e}")
    return mod, x, desc


def _first(v) -> int:
    """``14`` or ``(14, 14)`` -> 14 (configs give sizes either way)."""
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def _other_input(x, module, tower):
    """Another input the file claims to serve: batch 1 (the batch is always dynamic), and one patch
    more in height when the image size is dynamic."""
    import torch

    b = x[:1]
    if module.sizes_dynamic:
        p = _first(getattr(tower.config, "patch_size", 14))
        b = torch.cat([b, b[:, :, :p]], dim=2)
    return b.clone()


def _rel_err(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def missing_backend(backend: str) -> Optional[str]:
    """``None`` when ``backend``'s Python modules import, else a message naming the missing one and
    the extra that installs it (the CLI checks this before loading or capturing anything)."""
    import importlib

    modules, extra = BACKEND_MODULES.get(backend, ((), ""))
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            return (f"--format {backend} needs the Python module {name!r}, which cannot be imported "
                    f"({type(e).__name__}: {e}); install it with: {extra}")
    return None


# --------------------------------------------------------------------------------------------- commands
def cmd_export(args) -> int:
    import torch

    import ipcv_compile
    from ipcv_compile.lower import LoweringError, BackendUnavailable

    backend = FORMATS[args.format]
    missing = missing_backend(backend)
    if missing and backend != "tensorrt":
        raise CLIError(missing, code=EXIT_BACKEND)
    if missing:  # the engine cannot be built; the GPU-free graph check still says whether it would convert
        print(f"ipcv export: {missing}. Running the TensorRT graph check only (no engine is built), then "
              f"exiting with {EXIT_BACKEND}; `ipcv trt-check MODEL` runs the check alone.", file=sys.stderr, flush=True)
    prog = Progress(4 if backend == "tensorrt" or not args.no_verify else 3, quiet=args.quiet)
    prog.start(f"loading {args.model}")
    tower, kind = load_tower(args.model)
    cfg = ipcv_config(args, kind)
    prog.done(type(tower).__name__)
    prog.start(f"capturing and rewriting (retain={cfg.retain}, l_p={cfg.prune_layer}, Δ={cfg.as_depth}, k={cfg.k})")
    rt = rewrite_tower(tower, cfg)
    cfg = rt.ipcv_config  # resolved for the tower (its default l_p / Δ)
    module, x, inputs = example_inputs(tower, rt, args, kind)
    with torch.no_grad():
        ref = module(x)
    prog.done(rt.adapter.describe())
    out = os.path.abspath(args.out)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    if backend == "tensorrt":
        from ipcv_compile.tensorrt_check import tensorrt_check

        prog.start("TensorRT graph check (static shapes)")
        report = tensorrt_check(module, (x,))
        prog.done("OK" if report.ok else "FAILED")
        print(report.format())
        if not report.ok:
            return 4
        prog.start("building the TensorRT engine")
        if missing:
            raise CLIError(missing, code=EXIT_BACKEND)
        try:
            lowered = ipcv_compile.lower(module, "tensorrt", (x,), path=out, save=True)
        except BackendUnavailable as e:
            raise CLIError(str(e), code=3)
        prog.done()
    else:
        prog.start(f"exporting to {args.format} ({out})")
        try:
            lowered = ipcv_compile.lower(module, backend, (x,), path=out, dynamic=not module.packed)
        except LoweringError as e:
            raise CLIError(str(e), code=4)
        prog.done(f"dynamic dims: {lowered.dynamic_dims or 'none'}")
    err = None
    checked = []
    if not args.no_verify:
        prog.start("reloading the artifact and comparing with the eager rewritten tower")
        fixed = {k: v for k, v in module.fixed_kwargs.items() if k == "grid_thw"}
        if backend in ("pt2", "onnx"):
            from ipcv_compile.backends.artifacts import load_artifact

            runner = load_artifact(out)
        else:
            runner = lowered
        # the example, and where the file claims a dynamic batch / image size, another one
        cases = [x]
        if not module.packed:
            cases.append(_other_input(x, module, tower))
        err = 0.0
        for xi in cases:
            with torch.no_grad():
                want = module(xi)
                try:
                    got = runner(xi, **fixed) if backend in ("pt2", "onnx") else runner(xi)
                except Exception as e:
                    print(f"ipcv export: verification FAILED: the artifact does not run on pixel_values of shape "
                          f"{list(xi.shape)} it declares it serves: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                          file=sys.stderr)
                    return 4
            got = got if isinstance(got, (tuple, list)) else (got,)
            err = max(err, max(_rel_err(g.cpu(), r) for g, r in zip(got, want)))
            checked.append(list(xi.shape))
        prog.done(f"max relative error {err:.2e} on pixel_values {checked}")
        if err > VERIFY_TOL:
            print(f"ipcv export: verification FAILED: relative error {err:.2e} > {VERIFY_TOL}", file=sys.stderr)
            return 4
    meta = module.ipcv_metadata()
    call = "m(pixel_values, grid_thw=grid_thw)" if module.packed else "m(pixel_values)"
    side = {
        "ipcv_export": {
            "model": args.model, "tower": type(tower).__name__, "adapter": rt.adapter.name, "format": args.format,
            "artifact": out, "ipcv_config": cfg.to_dict(),
            "example_inputs": inputs, "dynamic_dims": lowered.dynamic_dims,
            "fixed_inputs": meta.get("fixed_inputs", {}), "layout": meta.get("layout"),
            "image_size": meta.get("image_size"),
            "outputs": ["last_hidden_state"] + (["pooler_output"] if len(ref) > 1 else []),
            "output_shapes": [list(r.shape) for r in ref], "verify_max_rel_error": err, "verified_on": checked,
            "torch": torch.__version__, "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "reload": {"pt2": f"m = ipcv_compile.backends.artifacts.load_artifact(path); {call}  (checks the fixed inputs; "
                              "plain: torch.export.load(path).module()(pixel_values))",
                       "onnx": f"m = ipcv_compile.backends.artifacts.load_artifact(path); {call}  (checks the fixed inputs; a bare "
                               "onnxruntime.InferenceSession(path).run(None, {'pixel_values': x}) cannot)",
                       "trt": "import torch_tensorrt; torch.export.load(path).module()(pixel_values.cuda())"}[args.format],
        }
    }
    with open(out + ".json", "w") as f:
        json.dump(side, f, indent=2, default=str)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB) and {out}.json")
    return 0


def _rewritten_example(args):
    """(tower, rewritten tower, exportable whole-tower module, example input) for MODEL and the
    IPCV options of ``args``."""
    tower, kind = load_tower(args.model)
    rt = rewrite_tower(tower, ipcv_config(args, kind))
    module, x, _ = example_inputs(tower, rt, args, kind)
    return tower, rt, module, x


def cmd_inspect(args) -> int:
    import torch

    tower, kind = load_tower(args.model)
    rt = rewrite_tower(tower, ipcv_config(args, kind))
    x, fixed, _ = example_call(tower, rt, args, kind)
    print(f"model: {args.model} ({type(tower).__name__}); example pixel_values {list(x.shape)}"
          + (f", grid_thw {fixed['grid_thw'].tolist()}" if "grid_thw" in fixed else ""))
    try:
        with torch.no_grad():
            text = rt.summary(example=((x,), fixed))
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"{type(tower).__name__} cannot run the example: {e}")
    print(text)
    return 0


def cmd_trt_check(args) -> int:
    from ipcv_compile.tensorrt_check import tensorrt_check

    tower, rt, module, x = _rewritten_example(args)
    report = tensorrt_check(module, (x,))
    print(report.format())
    return 0 if report.ok else 4


def cmd_demo(rest: Sequence[str]) -> int:
    from . import demo

    return int(demo.main(list(rest)) or 0)


def cmd_tune(rest: Sequence[str]) -> int:
    """``ipcv tune MODEL --images DIR --retain 0.35 [--budget latency|tokens] --out tuned.json``."""
    import inspect

    from ipcv_core.search import short_description

    from ..tune import __doc__ as tune_doc, tune_tower
    from .images import list_images, load_images

    ap = argparse.ArgumentParser(prog="ipcv tune", description=tune_doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", metavar="MODEL", help="local path or hub id of a supported checkpoint")
    ap.add_argument("--images", required=True, metavar="DIR", help="folder of unlabeled images")
    ap.add_argument("--retain", type=float, default=0.35)
    ap.add_argument("--budget", choices=("tokens", "latency"), default="tokens")
    ap.add_argument("--num-images", dest="num_images", type=int, default=32)
    ap.add_argument("--offset", type=int, default=0, help="skip the first OFFSET images of DIR (sorted by name), "
                    "e.g. to keep tuning images apart from evaluation images")
    ap.add_argument("--batch", type=int, default=4, help="images per forward pass")
    ap.add_argument("--screen-batches", dest="screen", type=int, default=1,
                    help="batches used to screen candidates (the best few are confirmed on all)")
    ap.add_argument("--size", type=int, default=448, help="square image size in pixels")
    ap.add_argument("--passes", type=int, default=2, help="coordinate-descent passes per family (>= 1)")
    ap.add_argument("--out", default="ipcv_tuned.json", metavar="PATH")
    args = ap.parse_args(list(rest))
    if not (0.0 < args.retain <= 1.0):
        ap.error(f"--retain must be in (0, 1], got {args.retain}")
    if args.passes < 1:
        ap.error(f"--passes must be >= 1, got {args.passes}")
    try:
        tower, _ = loading.load_tower(args.model)
    except ModelLoadError as e:
        ap.error(str(e))
    if "pixel_values" not in inspect.signature(tower.forward).parameters:
        ap.error(f"ipcv tune feeds images as pixel_values; {type(tower).__name__} takes other inputs "
                 "(call ipcv_adapters.tune.tune_tower with your own input batches)")
    files = list_images(args.images)[args.offset : args.offset + args.num_images]
    if not files:
        ap.error(f"no images left in {args.images} after --offset {args.offset}")
    batches = [dict(pixel_values=load_images(files[i : i + args.batch], args.size).to(tower.dtype))
               for i in range(0, len(files), args.batch)]
    print(f"ipcv tune: {type(tower).__name__}, {len(files)} images at {args.size}px, retain {args.retain}, "
          f"budget {args.budget}", flush=True)
    res = tune_tower(tower, batches, args.retain, args.budget, passes=args.passes,
                     progress=lambda m: print("  " + m, flush=True), screen=args.screen)
    print(res.format_table())
    print(f"\nbest: {short_description(res.best)}\nreference (paper): {short_description(res.reference)}\n"
          f"({res.seconds:.0f} s)")
    res.best.to_json(args.out)
    print(f"wrote {args.out}  (use: ipcv_compile.rewrite(tower, IPCVConfig.from_json({args.out!r})), or "
          f"ipcv export MODEL --config {args.out} ...)")
    return 0


# --------------------------------------------------------------------------------------------- parser
def tower_defaults(field: str) -> str:
    """``field``'s defaults as the help text states them, read from where they live (each registered
    adapter's ``default_config``, :class:`IPCVConfig`'s own default, the tiny models' config)."""
    from ipcv_core import IPCVConfig
    from ipcv_core.config import PAPER_DEFAULTS

    from ..registry import adapters
    from ..testing import TINY_IPCV

    if field in PAPER_DEFAULTS:
        seen = {}
        for a in reversed(adapters()):
            seen.setdefault(a.default_config.get(field, PAPER_DEFAULTS[field]), []).append(a.name)
        parts = [f"{v} ({', '.join(names)})" for v, names in seen.items()]
    else:
        parts = [str(getattr(IPCVConfig(), field))]
    return "; ".join(parts + [f"tiny models {getattr(TINY_IPCV, field)}"])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ipcv", description="IPCV token compression for MLLM vision towers: export, "
                                 "inspect, check.", formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"MODEL: {allowed_models()}.")
    sub = ap.add_subparsers(dest="cmd", metavar="{export,inspect,trt-check,tune,demo}")

    def common(p):
        p.add_argument("model", metavar="MODEL", help=f"{allowed_models()}")
        p.add_argument("--retain", type=float, default=None,
                       help="fraction of tokens kept per image / frame / tile (default 0.35, or --config's)")
        p.add_argument("--config", default=None, metavar="JSON",
                       help="IPCV config file (e.g. from ipcv tune); options given here override its fields")
        p.add_argument("--prune-layer", dest="prune_layer", type=int, default=None,
                       help=f"l_p (default: the tower's, clipped to its depth: {tower_defaults('prune_layer')})")
        p.add_argument("--as-depth", dest="as_depth", type=int, default=None,
                       help=f"Δ, attention-stabilisation blocks (default: the tower's: {tower_defaults('as_depth')})")
        p.add_argument("--k", type=int, default=None, help=f"NGR neighbours (default: {tower_defaults('k')})")
        p.add_argument("--image-size", dest="image_size", type=int, default=None,
                       help="example image size in pixels for batched towers (default: the model's native size)")
        p.add_argument("--batch", type=int, default=2, help="example batch for batched towers (default 2: keeps the batch dynamic)")
        p.add_argument("--grid", type=_parse_grid, action="append", default=None, metavar="T,H,W",
                       help="Qwen2-VL: one image / video grid in patches (repeatable); the export is for this layout")

    p = sub.add_parser("export", help="export a rewritten tower to onnx / trt / pt2")
    common(p)
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="onnx (onnxruntime), pt2 (torch.export archive), "
                   "trt (TensorRT engine via torch-tensorrt; needs CUDA)")
    p.add_argument("--out", required=True, metavar="PATH", help="artifact path (a PATH.json sidecar is written beside it)")
    p.add_argument("--no-verify", dest="no_verify", action="store_true", help="skip reloading and comparing the artifact")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("inspect", help="print the rewrite summary (IPCVModule.summary())")
    common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("trt-check", help="check that torch-tensorrt can convert the rewritten tower (no GPU needed)")
    common(p)
    p.set_defaults(func=cmd_trt_check)

    sub.add_parser("demo", help="vanilla vs IPCV on real DINOv2-S (= python -m ipcv_adapters.app.demo; args passed on)",
                   add_help=False)
    sub.add_parser("tune", help="pick the IPCV variant that preserves most on your images (ipcv tune MODEL --images DIR "
                   "--retain R [--budget tokens|latency]; args passed on)", add_help=False)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        return cmd_demo(argv[1:])
    if argv and argv[0] == "tune":
        return cmd_tune(argv[1:])
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.cmd:
        ap.print_help()
        return 2
    if args.retain is not None and not (0.0 < args.retain <= 1.0):
        ap.error(f"--retain must be in (0, 1], got {args.retain}")
    try:
        return int(args.func(args) or 0)
    except CLIError as e:
        print(f"ipcv {args.cmd}: error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    raise SystemExit(main())
