"""Differential fuzzing of the IPCV rewrite: the rewritten graph of many generated (tower, config,
input) cases against references (the compiler-testing practice: a transformed program against a
reference on many generated programs).

    python tests/fuzz.py --cases 5000 [--seed S] [--shapes 3] [--onnx 20] [--compile 10] [--layout 10] [--minutes 20]
    python tests/fuzz.py --case '{"family": "dinov2", ...}'     # re-run one (minimised) case

Pool.  :data:`FAMILIES` has one entry per tower family (adding one is one entry).  Each run draws
``--shapes`` random tower shapes per family (depth 2-8, width / heads including odd head counts and
head sizes, LayerScale values, random weights) and captures each once (``ipcv_compile.rewrite`` at
retain 1.0); a case is one ``with_config`` rewrite of a pool tower (a fraction of a second).

Cases.  A random :class:`~ipcv_core.IPCVConfig`: retain in (0, 1] (exactly 1.0, tiny values, any),
``l_p`` / ``Δ`` anywhere in the depth, ``k`` from 1 to more than any segment keeps, every
selection / reconstruction / merge / weighting / placement rule, multi-stage schedules and the
gradual-merge family (``ipcv_core.search.merge_family_config``) — invalid combinations are
rejected by ``IPCVConfig`` itself and drawn again.  Inputs: batched towers get 1-3 images of 1x1 to
6x6 patches, square or not; packed towers 1-4 entries (images and 2-3-frame videos).

Checks (each a differential test; tolerances are relative: max-abs error / max-abs reference):

* ``graph==driver``: the rewritten tower vs ``ipcv_adapters.run_eager`` (ipcv_core's eager driver
  through the adapter's branches) <= 1e-5.  A mismatch whose keep sets differ only by a near-tie of
  the scores at the K boundary (relative gap < 1e-5: the two computations order a tie differently)
  is counted as a tie, not a failure;
* ``r=1``: the pool tower's rewrite at retain 1.0, and the case's config when its retain is 1.0
  (any variant), vs the original HF tower <= 1e-6;
* ``rows``: (a fifth of the cases) the rewrite pass's postcondition — the rows every block's
  attention and FFN see match the schedule (fake-tensor run);
* ``isolation``: one image (entry) alone vs its rows in the call <= 1e-5;
* ``nan``: (a tenth of the cases) one image set to NaN: its output is NaN, every other image's
  output is bit-identical to the clean call's;
* ``onnx``: (``--onnx`` cases) the whole tower exported to ONNX vs the eager graph <= 1e-4;
* ``onnx_layout``: (``--layout`` cases, packed towers, exported to ONNX) the file run by a bare
  onnxruntime session with its ``grid_thw`` input equals the eager graph <= 1e-4, and another
  ``grid_thw`` of the same shape (and patch count where one exists) makes the session raise;
* ``compile``: (``--compile`` cases) ``torch.compile`` of the rewritten tower (``aot_eager``: the
  same dynamo path as inductor, without its kernel compile), called before any eager call of the
  layout, vs the eager graph <= 1e-4.

A failing case is minimised (depth, images, image size, retain, k, stages, variants, ... shrunk
toward simpler values while it still fails) and printed as JSON for ``--case``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

TOL_DRIVER = 1e-5
TOL_R1 = 1e-6
TOL_ISOLATION = 1e-5
TOL_ONNX = 1e-4
TOL_COMPILE = 1e-4
TIE_GAP = 1e-5


# --------------------------------------------------------------------------------------------- pool
@dataclass(frozen=True)
class Family:
    """One tower family of the pool.  ``name``: the ``ipcv_adapters.testing`` tower name (its
    ``tiny_tower`` gives the classes, ``_vision_kwargs`` the base config); the ``*_key`` fields name
    the config fields varied; ``widths``: (width, heads) choices; ``packed``: grid_thw inputs;
    ``interp``: pass ``interpolate_pos_encoding=True`` (towers that only interpolate on request)."""

    name: str
    width_key: str = "hidden_size"
    heads_key: str = "num_attention_heads"
    mlp_key: Optional[str] = "intermediate_size"
    ls_key: Optional[str] = None
    widths: Tuple[Tuple[int, int], ...] = ((64, 4), (48, 3), (45, 5), (27, 3), (32, 1))
    packed: bool = False
    interp: bool = False
    max_side: int = 6


_QWEN_WIDTHS = ((64, 4), (48, 3), (40, 5), (24, 2), (36, 3))  # rotary: head dims divisible by 4
FAMILIES: Dict[str, Family] = {f.name: f for f in (
    Family("qwen2_vl", width_key="embed_dim", heads_key="num_heads", mlp_key=None, widths=_QWEN_WIDTHS, packed=True),
    Family("qwen2_5_vl", heads_key="num_heads", widths=_QWEN_WIDTHS, packed=True),
    Family("qwen3_vl", heads_key="num_heads", widths=_QWEN_WIDTHS, packed=True),
    Family("qwen3_5", heads_key="num_heads", widths=_QWEN_WIDTHS, packed=True),
    Family("internvl", ls_key="layer_scale_init_value"),
    Family("dinov2", mlp_key=None, ls_key="layerscale_value"),
    Family("siglip", interp=True),
    Family("clip", interp=True),
)}


@dataclass(frozen=True)
class Shape:
    family: str
    depth: int
    width: int
    heads: int
    layerscale: float = 1.0
    seed: int = 0


def available_families() -> List[str]:
    from ipcv_adapters import testing

    return [f for f in FAMILIES if f in testing.TOWERS]


def build_tower(shape: Shape):
    """A random-weight tower of ``shape`` (eval mode, fp32, SDPA)."""
    from ipcv_adapters import testing

    fam = FAMILIES[shape.family]
    proto = testing.tiny_tower(shape.family, depth=2)
    kw = testing._vision_kwargs(shape.family, shape.depth)
    kw[fam.width_key] = shape.width
    kw[fam.heads_key] = shape.heads
    if fam.mlp_key:
        kw[fam.mlp_key] = 2 * shape.width + 1  # odd FFN width
    if fam.ls_key:
        kw[fam.ls_key] = shape.layerscale
    if "deepstack_visual_indexes" in kw:  # distinct taps, as real configs have (testing's depth-3 one repeats one)
        kw["deepstack_visual_indexes"] = sorted(set(kw["deepstack_visual_indexes"]))
    torch.manual_seed(shape.seed)
    m = type(proto)._from_config(type(proto.config)(**kw), attn_implementation="sdpa").eval()
    emb = getattr(m, "embeddings", None)
    with torch.no_grad():  # post_init zeroes some embeddings: give them values (as tiny_tower does)
        for name in ("cls_token", "position_embeddings", "mask_token", "register_tokens"):
            t = getattr(emb, name, None)
            if isinstance(t, torch.Tensor) and t.numel() and not t.abs().sum():
                t.normal_(0, 0.5)
    return m


class Pool:
    """Captured towers: one capture per :class:`Shape` (``ipcv_compile.rewrite`` at retain 1.0)."""

    def __init__(self):
        self.towers: Dict[Shape, Tuple[Any, Any]] = {}
        self.capture_s = 0.0

    def get(self, shape: Shape):
        if shape not in self.towers:
            import ipcv_compile
            from ipcv_core import IPCVConfig

            t0 = time.perf_counter()
            tower = build_tower(shape)
            base = ipcv_compile.rewrite(tower, IPCVConfig(retain=1.0, prune_layer=1, as_depth=0, k=1))
            self.capture_s += time.perf_counter() - t0
            self.towers[shape] = (tower, base)
        return self.towers[shape]


def random_shape(rng: random.Random, family: str) -> Shape:
    fam = FAMILIES[family]
    width, heads = rng.choice(fam.widths)
    return Shape(family, rng.randint(2, 8), width, heads, rng.choice([1.0, 0.5, 0.1]) if fam.ls_key else 1.0,
                 rng.randrange(1 << 16))


# --------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    shape: Shape
    config: Dict[str, Any]  # IPCVConfig fields
    images: List[List[int]]  # batched: [[h, w]] * B (same size); packed: grid_thw rows [t, h, w]
    seed: int = 0
    nan: bool = False
    onnx: bool = False
    verify_rows: bool = False  # also run the rewrite pass's postcondition (rows per block, fake tensors)
    compile: bool = False  # also torch.compile the rewritten tower

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, sort_keys=True)

    @staticmethod
    def from_json(s: str) -> "Case":
        d = json.loads(s)
        d["shape"] = Shape(**d["shape"])
        return Case(**d)

    def describe(self) -> str:
        c = self.config
        extra = {k: v for k, v in c.items() if k not in ("retain", "prune_layer", "as_depth", "k")}
        return (f"{self.shape.family} depth {self.shape.depth} width {self.shape.width}/{self.shape.heads}h "
                f"ls {self.shape.layerscale} | retain {c['retain']:.4g} l_p {c['prune_layer']} Δ {c['as_depth']} "
                f"k {c['k']} {extra} | images {self.images}{' +nan' if self.nan else ''}{' +onnx' if self.onnx else ''}"
                f"{' +compile' if self.compile else ''}")


def _names(fn_name: str, default):
    from ipcv_core import rules

    fn = getattr(rules, fn_name, None)
    return tuple(fn()) if fn else default


def random_config(rng: random.Random, depth: int):
    """A random valid IPCVConfig for ``depth`` blocks (IPCVConfig rejects invalid draws)."""
    from ipcv_core import IPCVConfig
    from ipcv_core.search import merge_family_config

    for _ in range(200):
        u = rng.random()
        retain = 1.0 if u < 0.15 else (rng.uniform(0.005, 0.06) if u < 0.25 else rng.uniform(0.06, 1.0))
        retain = round(retain, 4) or 0.005
        if rng.random() < 0.12:
            try:
                cfg = merge_family_config(max(retain, 0.5 ** (depth - 1) + 1e-3), depth, first=rng.randint(1, depth - 1),
                                          k=rng.choice([1, 2, 3]), merge=rng.choice(["average", "size_bias"]))
                cfg.validate_depth(depth)
                return cfg
            except ValueError:
                continue
        lp = rng.randint(1, depth - 1)
        fields = dict(retain=retain, prune_layer=lp, as_depth=rng.randint(0, depth - lp),
                      k=rng.choice([1, 2, 3, 4, 7, 10, 60]),
                      weighting=rng.choice(["mean", "similarity"]),
                      selection=rng.choice(_names("selection_names", ("score",))),
                      reconstruction=rng.choice(_names("reconstruction_names", ("feature",))),
                      merge=rng.choice(_names("merge_names", ("none",))),
                      seed=rng.randrange(100))
        placements = _names("placement_names", ())
        if placements and "placement" in IPCVConfig.field_names():
            fields["placement"] = rng.choice(placements)
        if rng.random() < 0.5:
            fields.update(selection="score", reconstruction="feature", merge="none", weighting="mean")
        if rng.random() < 0.25 and lp > 1 and retain < 0.99:  # earlier stages
            layers = sorted(rng.sample(range(1, lp), rng.randint(1, min(2, lp - 1))))
            rs = sorted((round(rng.uniform(retain, 1.0), 4) for _ in layers), reverse=True)
            fields["stages"] = tuple(zip(layers, rs))
        try:
            cfg = IPCVConfig(**fields)
            cfg.validate_depth(depth)
            return cfg
        except ValueError:
            continue
    return IPCVConfig(retain=0.5, prune_layer=1, as_depth=0, k=2)


def random_images(rng: random.Random, fam: Family) -> List[List[int]]:
    if fam.packed:
        out = []
        for _ in range(rng.randint(1, 4)):
            t = 1 if rng.random() < 0.6 else rng.randint(2, 3)
            out.append([t, 2 * rng.randint(1, 4), 2 * rng.randint(1, 4)])
        return out
    u = rng.random()
    if u < 0.12:
        h = w = 1  # one patch
    elif u < 0.55:
        h = w = rng.randint(2, fam.max_side)
    else:
        h, w = rng.randint(1, fam.max_side), rng.randint(1, fam.max_side)
    return [[h, w]] * rng.randint(1, 3)


def random_case(rng: random.Random, shapes: Sequence[Shape], onnx: bool = False, compile: bool = False) -> Case:
    shape = rng.choice(list(shapes))
    cfg = random_config(rng, shape.depth)
    return Case(shape, _cfg_dict(cfg), random_images(rng, FAMILIES[shape.family]), rng.randrange(1 << 20),
                nan=rng.random() < 0.1, onnx=onnx, verify_rows=rng.random() < 0.2, compile=compile)


def _cfg_dict(cfg) -> Dict[str, Any]:
    d = cfg.to_dict()
    d.pop("extras", None)
    d["stages"] = [list(s) for s in d.get("stages", [])]
    return d


def _config(case: Case):
    from ipcv_core import IPCVConfig

    d = dict(case.config)
    d["stages"] = tuple(tuple(s) for s in d.get("stages", ()))
    return IPCVConfig(**d)


# --------------------------------------------------------------------------------------------- inputs
def case_inputs(case: Case, tower) -> Tuple[tuple, dict]:
    from ipcv_adapters import testing

    fam = FAMILIES[case.shape.family]
    if fam.packed:
        pv, thw = testing.qwen2vl_inputs(case.images, seed=case.seed, in_dim=testing.patch_dim(fam.name))
        return (pv,), {"grid_thw": thw}
    ps = tower.config.patch_size
    ps = ps[0] if isinstance(ps, (list, tuple)) else ps
    h, w = case.images[0]
    g = torch.Generator().manual_seed(case.seed)
    x = torch.randn(len(case.images), 3, h * ps, w * ps, generator=g)
    kw = {"pixel_values": x}
    if fam.interp:
        kw["interpolate_pos_encoding"] = True
    return (), kw


def _tensors(o) -> List[torch.Tensor]:
    if isinstance(o, torch.Tensor):
        return [o]
    if o is None:
        return []
    if hasattr(o, "to_tuple"):
        o = o.to_tuple()
    if isinstance(o, dict):
        o = list(o.values())
    if isinstance(o, (list, tuple)):
        return [t for x in o for t in _tensors(x)]
    return []


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if a.shape != b.shape:
        return float("inf")
    if not a.numel():
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _worst(a, b) -> float:
    ta, tb = _tensors(a), _tensors(b)
    if len(ta) != len(tb):
        return float("inf")
    return max((_rel(x, y) for x, y in zip(ta, tb)), default=0.0)


# --------------------------------------------------------------------------------------------- checks
@dataclass
class Result:
    case: Case
    failures: List[Tuple[str, str]] = field(default_factory=list)
    ties: List[str] = field(default_factory=list)
    measured: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    rejected: Optional[str] = None  # the rewrite refused the config (RewriteError naming why)

    @property
    def ok(self) -> bool:
        return not self.failures


def _near_tie(res, eps: float = TIE_GAP) -> bool:
    """Does any stage's selection have a near-tie at its K boundary (kept vs removed scores)?"""
    if res is None:
        return False
    for st in res.stages:
        s = st.scores.float()
        if not s.numel() or st.rem_idx.shape[1] == 0 or st.keep_idx.shape[1] == 0:
            continue
        kept = torch.gather(s, 1, st.keep_idx.clamp_max(s.shape[1] - 1))
        rem = torch.gather(s, 1, st.rem_idx.clamp_max(s.shape[1] - 1))
        scale = s.abs().max().clamp_min(1e-12)
        # the closest kept / removed pair in each row (any segment: conservative)
        gap = (kept.unsqueeze(2) - rem.unsqueeze(1)).abs().amin(dim=(1, 2)) / scale
        if bool((gap < eps).any()):
            return True
    return False


def _entry_slices(images: List[List[int]], merge: int = 4):
    start = mstart = 0
    for t, h, w in images:
        n = t * h * w
        yield (start, start + n), (mstart, mstart + n // merge)
        start, mstart = start + n, mstart + n // merge


def run_case(case: Case, pool: Pool,
             checks: Sequence[str] = ("driver", "r1", "isolation", "nan", "onnx", "compile")) -> Result:
    import ipcv_adapters

    t0 = time.perf_counter()
    r = Result(case)
    fam = FAMILIES[case.shape.family]
    tower, base = pool.get(case.shape)
    cfg = _config(case)
    args, kw = case_inputs(case, tower)
    if case.verify_rows:
        r.measured["rows"] = 0.0  # the pass's postcondition runs inside the first rewrite (a failure raises)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rt = base.with_config(cfg, verify_rows=case.verify_rows)
            if "compile" in checks and case.compile:  # before any eager call of this layout
                got = _compiled(rt, args, kw)
            with torch.no_grad():
                out = rt(*args, **kw)
            if "compile" in checks and case.compile:
                err = _worst(got, out)
                r.measured["compile"] = err
                if not err <= TOL_COMPILE:
                    r.failures.append(("compile", f"torch.compile vs the eager graph: relative error {err:.3e} > "
                                                  f"{TOL_COMPILE}"))
            with torch.no_grad():
                if "driver" in checks:
                    ref, res = ipcv_adapters.run_eager(tower, cfg, *args, **kw)
                    err = _worst(out, ref)
                    r.measured["driver"] = err
                    if not err <= TOL_DRIVER:
                        if _near_tie(res):
                            r.ties.append(f"graph vs driver {err:.2e} with a near-tie at a K boundary")
                        else:
                            r.failures.append(("driver", f"rewritten graph vs eager driver: relative error {err:.3e} > {TOL_DRIVER}"))
                if "r1" in checks:  # the pool's retain-1.0 rewrite, and the case's own config at retain 1.0
                    orig = tower(*args, **kw)
                    err = _worst(base(*args, **kw), orig)
                    if cfg.retain == 1.0:
                        err = max(err, _worst(out, orig))
                    r.measured["r1"] = err
                    if not err <= TOL_R1:
                        r.failures.append(("r1", f"retain 1.0 vs the original tower: relative error {err:.3e} > {TOL_R1}"))
                if "isolation" in checks and len(case.images) > 1:
                    _isolation(case, rt, tower, out, args, kw, r, fam)
                if "nan" in checks and case.nan and len(case.images) > 1:
                    _nan(case, rt, out, args, kw, r, fam)
            if "onnx" in checks and case.onnx:
                _onnx(case, rt, args, kw, r, fam)
    except Exception as e:  # a crash is a failure too; a clean refusal of the config is counted apart
        from ipcv_compile import LocateError, RewriteError

        if isinstance(e, (RewriteError, LocateError, NotImplementedError)):
            r.rejected = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            r.seconds = time.perf_counter() - t0
            return r
        r.failures.append(("crash", f"{type(e).__name__}: {str(e).splitlines()[0][:400] if str(e) else ''}\n"
                                    + "".join(traceback.format_exception(e)[-4:])[-1500:]))
    r.seconds = time.perf_counter() - t0
    return r


def _isolation(case, rt, tower, out, args, kw, r, fam):
    rng = random.Random(case.seed)
    i = rng.randrange(len(case.images))
    if fam.packed:
        (a, b), (ma, mb) = list(_entry_slices(case.images, tower.spatial_merge_size ** 2))[i]
        pv = args[0][a:b]
        alone = rt(pv, grid_thw=kw["grid_thw"][i:i + 1])
        pairs = [(out.last_hidden_state[a:b], alone.last_hidden_state), (out.pooler_output[ma:mb], alone.pooler_output)]
    else:
        kw1 = dict(kw, pixel_values=kw["pixel_values"][i:i + 1])
        alone = rt(**kw1)
        pairs = [(x[i:i + 1], y) for x, y in zip(_tensors(out), _tensors(alone)) if x.shape[0] == len(case.images)]
    err = max(_rel(x, y) for x, y in pairs)
    r.measured["isolation"] = err
    if not err <= TOL_ISOLATION:
        r.failures.append(("isolation", f"image {i} alone vs in the call: relative error {err:.3e} > {TOL_ISOLATION}"))


def _nan(case, rt, out, args, kw, r, fam):
    rng = random.Random(case.seed + 1)
    i = rng.randrange(len(case.images))
    if fam.packed:
        slices = list(_entry_slices(case.images, rt.spatial_merge_size ** 2))
        (a, b), _ = slices[i]
        pv = args[0].clone()
        pv[a + (b - a) // 2, 0] = float("nan")
        got = rt(pv, grid_thw=kw["grid_thw"])
        h, h0 = got.last_hidden_state, out.last_hidden_state
        bad_rows = h[a:b]
        others = [(h[x:y], h0[x:y]) for j, ((x, y), _) in enumerate(slices) if j != i]
    else:
        x = kw["pixel_values"].clone()
        x[i, 0, 0, 0] = float("nan")
        got = rt(**dict(kw, pixel_values=x))
        h, h0 = got.last_hidden_state, out.last_hidden_state
        bad_rows = h[i]
        others = [(h[j], h0[j]) for j in range(len(case.images)) if j != i]
    if torch.isfinite(bad_rows).all():
        r.failures.append(("nan", f"image {i} was NaN but its output is finite"))
    if not all(torch.equal(p, q) for p, q in others):
        r.failures.append(("nan", f"a NaN in image {i} changed another image's output"))


def _compiled(rt, args, kw):
    """``torch.compile(rt)`` called on the case (``aot_eager``; a fresh dynamo cache, so no earlier
    case's guards or recompile limit are in play)."""
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            return torch.compile(rt, backend="aot_eager")(*args, **kw)
    finally:
        torch._dynamo.reset()


def _other_grid(grids: List[List[int]]) -> List[List[int]]:
    """Another ``grid_thw`` of the same shape: the same patch count where one exists (entries
    reordered, an entry's height and width swapped or refactored), else one value changed."""
    if len({tuple(g) for g in grids}) > 1:
        return list(reversed(grids))
    out = [list(g) for g in grids]
    t, h, w = out[0]
    if h != w:
        out[0] = [t, w, h]
        return out
    for h2 in range(2, h * w, 2):
        if (h * w) % h2 == 0 and ((h * w) // h2) % 2 == 0 and h2 != h:
            out[0] = [t, h2, (h * w) // h2]
            return out
    out[0] = [t + 1, h, w]  # no other layout of this patch count: another one of the same shape
    return out


def _bare_session(path, x, thw, grids, want, r):
    """The packed file in a bare onnxruntime session: its grid_thw input, checked inside the graph."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 4  # the refused call below is expected: no error log line for it
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    got = [torch.from_numpy(o) for o in s.run(None, {"pixel_values": x.numpy(), "grid_thw": thw.numpy()})]
    err = _worst(got, want)
    r.measured["onnx_layout"] = err
    if not err <= TOL_ONNX:
        r.failures.append(("onnx_layout", f"bare onnxruntime session vs eager graph: relative error {err:.3e} > {TOL_ONNX}"))
    other = _other_grid(grids)
    try:
        s.run(None, {"pixel_values": x.numpy(), "grid_thw": np.array(other, dtype=np.int64)})
    except Exception as e:
        if "ipcv_layout_check" not in str(e):
            r.failures.append(("onnx_layout", f"grid_thw {other}: the session failed, but not at the layout check: "
                                              f"{str(e)[:300]}"))
        return
    r.failures.append(("onnx_layout", f"a bare onnxruntime session ran the file for {grids} on grid_thw {other} "
                                      "without an error"))


def _onnx(case, rt, args, kw, r, fam):
    from ipcv_adapters.export import TowerForExport
    from ipcv_compile import lower

    if rt.ipcv_config.reconstruction_rule.needs_grid:
        # grid distances tie exactly and ONNX Runtime's TopK breaks ties differently (README)
        r.ties.append("onnx skipped: grid-distance neighbours tie by construction")
        return

    with tempfile.TemporaryDirectory() as d:
        if fam.packed:
            mod = TowerForExport(rt, args, {"grid_thw": kw["grid_thw"]})
            x, fixed = args[0], {"grid_thw": kw["grid_thw"]}
        else:
            x = kw["pixel_values"]
            opts = {"interpolate_pos_encoding": True} if fam.interp else {}
            ex = x
            try:
                mod = TowerForExport(rt, (ex,), opts)
            except ValueError:  # an example too small to prune from: export at 6 x 6 patches, run at the case's size
                ps = x.shape[-1] // case.images[0][1]
                ex = torch.randn(2, 3, 6 * ps, 6 * ps, generator=torch.Generator().manual_seed(case.seed))
                try:
                    mod = TowerForExport(rt, (ex,), opts)
                except ValueError as e:  # a stage keeps every token even there (retain ~1): refused, documented
                    if "token(s) from an image" not in str(e):
                        raise
                    r.ties.append("onnx skipped: a stage removes < 2 tokens per image at the largest example size")
                    return
            fixed = {}
        with torch.no_grad():
            want = mod(x)
        lw = lower(mod, "onnx", (ex if not fam.packed else x,), path=os.path.join(d, "m.onnx"), dynamic=not fam.packed)
        try:
            got = lw(x, **fixed)
        except ValueError as e:  # exported at another size: the file's shape guards refuse this one (README)
            if fam.packed or ex is x or "does not serve inputs of shape" not in str(e):
                raise
            r.ties.append("onnx checked at the 6 x 6 export size: the file's shape guards refuse the case's size")
            with torch.no_grad():
                want = mod(ex)
            got = lw(ex, **fixed)
        if fam.packed:
            _bare_session(os.path.join(d, "m.onnx"), x, kw["grid_thw"], case.images, want, r)
    err = _worst(got, want)
    r.measured["onnx"] = err
    if not err <= TOL_ONNX:
        r.failures.append(("onnx", f"ONNX vs eager graph: relative error {err:.3e} > {TOL_ONNX}"))


# --------------------------------------------------------------------------------------------- minimiser
def _shrinks(case: Case):
    """Simpler variants of ``case``, simplest first."""
    c = case.config
    sh = case.shape
    fam = FAMILIES[sh.family]
    out: List[Case] = []

    def with_cfg(**ch):
        d = dict(c, **ch)
        return replace(case, config=d)

    if case.nan:
        out.append(replace(case, nan=False))
    if case.onnx:
        out.append(replace(case, onnx=False))
    if len(case.images) > 1:
        out += [replace(case, images=case.images[:1]), replace(case, images=case.images[:-1])]
        if fam.packed:
            out += [replace(case, images=[im for j, im in enumerate(case.images) if j != i])
                    for i in range(len(case.images))]
    if fam.packed:  # per entry: fewer frames, then 2 patches less in height / width
        for i, (t, h, w) in enumerate(case.images):
            for sm in ([1, h, w], [t, max(2, h - 2), w], [t, h, max(2, w - 2)]):
                if sm != [t, h, w]:
                    out.append(replace(case, images=[sm if j == i else im for j, im in enumerate(case.images)]))
    else:  # every image of a batched call has the same size
        h, w = case.images[0]
        for sm in ([max(1, h - 1), w], [h, max(1, w - 1)]):
            if sm != [h, w]:
                out.append(replace(case, images=[sm] * len(case.images)))
    if c.get("stages"):
        out.append(with_cfg(stages=[]))
    for k, v in (("merge", "none"), ("selection", "score"), ("reconstruction", "feature"), ("weighting", "mean"),
                 ("placement", "block_input")):
        if k in c and c[k] != v:
            out.append(with_cfg(**{k: v}))
    if c["k"] > 1:
        out += [with_cfg(k=v) for v in sorted({1, c["k"] // 2, c["k"] - 1}) if 1 <= v < c["k"]]
    if c["as_depth"]:
        out += [with_cfg(as_depth=0), with_cfg(as_depth=c["as_depth"] - 1)]
    if c["prune_layer"] > 1 and not c.get("stages"):
        out.append(with_cfg(prune_layer=c["prune_layer"] - 1, as_depth=min(c["as_depth"], sh.depth - c["prune_layer"] + 1)))
    if c["retain"] < 1.0 and not c.get("stages"):  # toward 1.0 (nothing removed), never back
        out += [with_cfg(retain=1.0)] + ([with_cfg(retain=0.5)] if c["retain"] < 0.5 else [])
    if sh.depth > 2:
        d2 = sh.depth - 1
        lp = min(c["prune_layer"], d2 - 1)
        st = [s for s in c.get("stages", []) if s[0] < lp]
        out.append(replace(case, shape=replace(sh, depth=d2),
                           config=dict(c, prune_layer=lp, as_depth=min(c["as_depth"], d2 - lp), stages=st)))
    if (sh.width, sh.heads) != fam.widths[0]:
        out.append(replace(case, shape=replace(sh, width=fam.widths[0][0], heads=fam.widths[0][1])))
    if sh.layerscale != 1.0:
        out.append(replace(case, shape=replace(sh, layerscale=1.0)))
    return out


def _valid(case: Case) -> bool:
    try:
        _config(case).validate_depth(case.shape.depth)
        return True
    except ValueError:
        return False


def minimise(case: Case, kinds: Sequence[str], pool: Pool, budget_s: float = 300.0, log=print) -> Case:
    """Greedy shrinking: keep the first simpler variant that still fails a check of ``kinds``."""
    t0 = time.perf_counter()
    checks = tuple({"crash": "driver", "onnx_layout": "onnx"}.get(k, k) for k in kinds) + ("driver",)
    changed = True
    while changed and time.perf_counter() - t0 < budget_s:
        changed = False
        for cand in _shrinks(case):
            if not _valid(cand):
                continue
            res = run_case(cand, pool, checks)
            if any(k in kinds for k, _ in res.failures):
                log(f"  shrunk: {cand.describe()}")
                case, changed = cand, True
                break
    return case


# --------------------------------------------------------------------------------------------- runner
@dataclass
class Summary:
    seed: int
    cases: int = 0
    failures: List[Result] = field(default_factory=list)
    ties: int = 0
    #: of ``ties``: ONNX exports skipped by a documented rule (ties by construction, shape guards); the
    #: check is owed to a later case, so these grow with the number of ONNX / layout cases
    onnx_skips: int = 0
    rejected: Dict[str, int] = field(default_factory=dict)
    checks: Dict[str, int] = field(default_factory=dict)
    worst: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    capture_s: float = 0.0
    minimised: List[Case] = field(default_factory=list)

    def format(self) -> str:
        lines = [f"ipcv fuzz: seed {self.seed}: {self.cases} cases, {len(self.failures)} failing, {self.ties} near-tie "
                 f"skips ({self.onnx_skips} of them ONNX exports skipped by rule), {self.seconds:.0f} s "
                 f"({self.capture_s:.0f} s capturing the pool)",
                 "checks run: " + ", ".join(f"{k} {v}" for k, v in sorted(self.checks.items())),
                 "worst relative error: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(self.worst.items()))]
        for why, n in sorted(self.rejected.items(), key=lambda kv: -kv[1]):
            lines.append(f"refused by the rewrite ({n} cases): {why}")
        for f in self.failures[:10]:
            lines.append(f"FAIL {f.case.describe()}")
            for k, msg in f.failures:
                lines.append(f"   [{k}] {msg}")
        for m in self.minimised:
            lines.append(f"smallest failing case: {m.describe()}\n  re-run: python tests/fuzz.py --case '{m.to_json()}'")
        return "\n".join(lines)


def fuzz(cases: int, seed: Optional[int] = None, shapes_per_family: int = 2, onnx: int = 3,
         minutes: Optional[float] = None, families: Optional[Sequence[str]] = None, minimise_failures: bool = True,
         log: Callable[[str], None] = print, compile: int = 3, layout: int = 2) -> Summary:
    """Run ``cases`` random cases (or until ``minutes``); returns a :class:`Summary`.  ``onnx`` /
    ``compile`` cases are also exported to ONNX / torch.compiled; ``layout`` more cases of packed
    towers are exported to ONNX and run in a bare onnxruntime session (a case the rewrite refuses
    passes its extra check on to the next case)."""
    torch.set_flush_denormal(True)
    seed = random.randrange(1 << 30) if seed is None else seed
    log(f"ipcv fuzz: seed {seed} (re-run: python tests/fuzz.py --cases {cases} --seed {seed})")
    rng = random.Random(seed)
    fams = list(families or available_families())
    pool = Pool()
    shapes = [random_shape(rng, f) for f in fams for _ in range(shapes_per_family)]
    onnx_at = set(rng.sample(range(cases), min(onnx, cases)))
    sel = random.Random(seed + 1)  # the compile / layout cases (drawn apart: the other draws stay as they were)
    early = range(cases - 20 if cases > 40 else cases)  # room for a case owed to the next one
    compile_at = set(sel.sample(early, min(compile, len(early))))
    packed_shapes = [sh for sh in shapes if FAMILIES[sh.family].packed]
    layout_at = set(sel.sample(early, min(layout, len(early)))) if packed_shapes else set()
    owed_compile = owed_layout = 0
    s = Summary(seed)
    t0 = time.perf_counter()
    for i in range(cases):
        if minutes is not None and time.perf_counter() - t0 > minutes * 60:
            log(f"time limit reached after {i} cases")
            break
        owed_compile += i in compile_at
        owed_layout += i in layout_at
        if owed_layout:  # a packed tower, exported to ONNX: its file's layout input
            case = random_case(rng, packed_shapes, onnx=True, compile=bool(owed_compile))
        else:
            case = random_case(rng, shapes, onnx=i in onnx_at, compile=bool(owed_compile))
        res = run_case(case, pool)
        # an extra check the case did not run (the rewrite refused the config, a documented tie rule
        # skipped the export) is owed to the next case
        owed_compile -= bool(owed_compile and ("compile" in res.measured or res.failures))
        owed_layout -= bool(owed_layout and ("onnx_layout" in res.measured or res.failures))
        s.cases += 1
        s.ties += len(res.ties)
        s.onnx_skips += sum(t.startswith("onnx") for t in res.ties)
        if res.rejected:
            key = res.rejected.split(" (")[0][:120]
            s.rejected[key] = s.rejected.get(key, 0) + 1
        for k, v in res.measured.items():
            s.checks[k] = s.checks.get(k, 0) + 1
            s.worst[k] = max(s.worst.get(k, 0.0), v)
        if not res.ok:
            s.failures.append(res)
            log(f"FAIL case {i}: {case.describe()}\n" + "\n".join(f"   [{k}] {m}" for k, m in res.failures))
        if (i + 1) % 100 == 0:
            log(f"  {i + 1} cases, {len(s.failures)} failing, {time.perf_counter() - t0:.0f} s")
    if minimise_failures:
        for f in s.failures[:3]:
            log(f"minimising: {f.case.describe()}")
            s.minimised.append(minimise(f.case, [k for k, _ in f.failures], pool, log=log))
    s.seconds = time.perf_counter() - t0
    s.capture_s = pool.capture_s
    return s


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=None, help="default: a fresh random seed (printed)")
    ap.add_argument("--shapes", type=int, default=3, help="random tower shapes per family in the pool")
    ap.add_argument("--onnx", type=int, default=None, help="cases also checked through ONNX (default cases // 100 + 3)")
    ap.add_argument("--compile", type=int, default=None, help="cases also checked through torch.compile "
                    "(default cases // 100 + 3)")
    ap.add_argument("--layout", type=int, default=None, help="extra packed cases exported to ONNX and run in a bare "
                    "onnxruntime session, with their grid_thw and another one (default cases // 100 + 2)")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this many minutes")
    ap.add_argument("--families", default=None, help="comma-separated subset of " + ", ".join(FAMILIES))
    ap.add_argument("--case", default=None, help="run one case given as JSON (from a failure report)")
    ap.add_argument("--no-minimise", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest
    if args.case:
        torch.set_flush_denormal(True)
        case = Case.from_json(args.case)
        res = run_case(case, Pool())
        print(case.describe())
        for k, m in res.failures:
            print(f"   [{k}] {m}")
        print("measured:", {k: f"{v:.2e}" for k, v in res.measured.items()}, "ties:", res.ties)
        return 0 if res.ok else 1
    onnx = args.onnx if args.onnx is not None else args.cases // 100 + 3
    fams = args.families.split(",") if args.families else None
    comp = args.compile if args.compile is not None else args.cases // 100 + 3
    layout = args.layout if args.layout is not None else args.cases // 100 + 2
    s = fuzz(args.cases, args.seed, args.shapes, onnx, args.minutes, fams, not args.no_minimise, compile=comp, layout=layout)
    print(s.format())
    return 0 if not s.failures else 1


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
