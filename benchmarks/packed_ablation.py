"""What each change of the packed-attention work buys: the rewrite with one piece switched back at
a time, timed in one run against the HF tower (eager, CPU).

    python -m benchmarks.packed_ablation --tower small --layout c --retain 0.35
    python -m benchmarks.packed_ablation --tower 7b --layout a --retain 0.35 --repeats 2

Rows (each a separate rewrite of the same tower):

* ``all``: the rewrite as shipped;
* ``- fused q split``: the fused qkv projection computed on all rows of an AS block (the query path
  still narrowed to the kept rows after the projection);
* ``- query narrowing``: the AS block's queries taken as the first ``K_i`` rows of each segment of
  the full query tensor (q projection and its rotary on all rows);
* ``- fused NGR``: NGR as one row gather + multiply-add per neighbour column instead of
  ``embedding_bag`` (what traced graphs record).

Random weights: denormals are flushed (``torch.set_flush_denormal(True)``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys

import torch


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _ngr_loop(h_rem_lp, h_keep_lp, h_keep_l, idx, weights):
    """NGR as traced graphs run it: a row gather and a multiply-add per neighbour column."""
    delta = h_keep_l - h_keep_lp
    B, R, k = idx.shape
    K, D = delta.shape[1], delta.shape[2]
    flat = delta.reshape(B * K, D)
    rows = (idx + (torch.arange(B) * K).view(B, 1, 1)).reshape(B * R, k)
    w = weights.to(delta.dtype).reshape(B * R, k)
    acc = h_rem_lp.to(h_keep_l.dtype).reshape(B * R, D)
    for j in range(k):
        acc = torch.addcmul(acc, flat.index_select(0, rows[:, j]), w[:, j:j + 1])
    return acc.view(B, R, D)


def main(argv=None) -> int:
    import ipcv_compile
    import ipcv_compile.ops as ops_mod
    import ipcv_compile.passes.attention_stabilisation as rw
    import ipcv_core.prune as prune_mod
    from ipcv_adapters.testing import qwen2vl_inputs
    from ipcv_core.config import IPCVConfig
    from ipcv_core.cost import round_robin

    from .packed import LAYOUTS, build_tower
    from .report import machine_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tower", default="small")
    ap.add_argument("--layout", default="c", choices=sorted(LAYOUTS))
    ap.add_argument("--retain", type=float, default=0.35)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_flush_denormal(True)
    tower = build_tower(args.tower, torch.float32, "cpu")
    pv, thw = qwen2vl_inputs(LAYOUTS[args.layout])
    cfg = IPCVConfig.paper(args.retain)
    if tower.config.depth < cfg.as_end:
        cfg = cfg.replace(as_depth=tower.config.depth - cfg.prune_layer)

    def rewrite(**patches):
        with contextlib.ExitStack() as stack:
            for name, value in patches.items():
                stack.enter_context(_patched(rw, name, value))
            t = ipcv_compile.rewrite(tower, cfg)
            t.graph_for(t.adapter.prepare(pv, grid_thw=thw).layout)  # build the layout's graph now
        return t

    def no_narrowing(ab, core, full_attn_in):
        return False

    towers = {
        "all": rewrite(),
        "- fused q split": rewrite(_split_projection=lambda *a, **k: None),
        "- query narrowing": rewrite(narrow_queries=no_narrowing),
    }
    rows = {"vanilla": lambda: tower(pv, grid_thw=thw)}
    for name, t in towers.items():
        rows[name] = (lambda t=t: t(pv, grid_thw=thw))
    loop_tower = towers["all"]

    def fused_ngr_off():
        with _patched(ops_mod, "_core_ngr", _ngr_loop), _patched(prune_mod, "ngr", _ngr_loop):
            return loop_tower(pv, grid_thw=thw)

    rows["- fused NGR"] = fused_ngr_off
    with torch.no_grad():
        ref = tower(pv, grid_thw=thw).last_hidden_state
        for name, fn in rows.items():
            out = fn().last_hidden_state
            assert out.shape == ref.shape, name
        load0 = os.getloadavg()
        rr = round_robin(rows, args.repeats, warmup=1)
        load1 = os.getloadavg()
    van = rr.median("vanilla")
    mach = machine_info()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "python -m benchmarks.packed_ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"`{cmd}` on {when} — {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']} with "
          f"{mach['torch_threads']} threads; load average {load0[0]:.1f} → {load1[0]:.1f}; median of {args.repeats} "
          f"interleaved rounds; denormals flushed\n")
    print(f"| row ({args.tower}, layout {args.layout}, retain {args.retain}) | ms | vs vanilla |\n|---|---|---|")
    for name in rows:
        print(f"| {name} | {1e3 * rr.median(name):.0f} | {rr.median(name) / van:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
