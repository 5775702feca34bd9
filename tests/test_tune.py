"""ipcv tune: the search respects the budget, never returns worse than the paper's configuration,
and its output round-trips into rewrite()."""

import torch

from ipcv_compile import LocateSpec, rewrite
from ipcv_core.cost import ModelDims, config_flops
from ipcv_core.search import tune
from ipcv_core import IPCVConfig, run_ipcv
from ipcv_core.testing import SyntheticViT, ViTSpec, make_inputs


def test_flops_model_orders_configs():
    kw = dict(n_tokens=1025, protected=1, depth=12, dims=ModelDims(384, 1536))
    van = config_flops(None, **kw)
    paper = config_flops(IPCVConfig(retain=0.5), **kw)
    later = config_flops(IPCVConfig(retain=0.5, prune_layer=6, as_depth=0), **kw)
    no_as = config_flops(IPCVConfig(retain=0.5, as_depth=0), **kw)
    assert no_as < paper < van and no_as < later < van
    assert config_flops(IPCVConfig(retain=0.2), **kw) < paper


def test_search_respects_budget_and_improves():
    """A synthetic objective: fidelity grows with l_p and prefers spatial similarity-weighted NGR;
    cost grows with l_p and Δ.  The tuner must stay within budget and beat the reference."""

    def fid(cfg):
        f = 0.5 + 0.05 * cfg.prune_layer + (0.1 if cfg.reconstruction == "spatial" else 0.0)
        f += 0.05 if cfg.weighting == "similarity" else 0.0
        return f - 0.01 * abs(cfg.k - 6)

    def cost(cfg):
        return (cfg.prune_layer + 0.3 * cfg.as_depth) / (3 + 0.3 * 7)

    res = tune(fid, cost, retain=0.35, depth=12)
    assert res.reference == IPCVConfig.paper(0.35)
    assert cost(res.best) <= 1.0
    assert fid(res.best) > fid(res.reference)
    assert res.best.reconstruction == "spatial" and res.best.weighting == "similarity" and res.best.k == 6
    assert all(c.cost <= 1.0 for c in res.table if c.feasible)
    assert any(not c.feasible for c in res.table), "over-budget candidates must be rejected"
    assert "fidelity" in res.format_table()


def test_without_grid_no_spatial_variants():
    res = tune(lambda c: 1.0 if c.reconstruction == "spatial" else 0.5, lambda c: 0.5, 0.5, 12, has_grid=False)
    assert all(c.config.reconstruction == "feature" and not c.config.selection.startswith("stratified") for c in res.table)


def test_tuned_config_round_trips_into_rewrite(tmp_path):
    cfg = IPCVConfig(retain=0.35, prune_layer=2, as_depth=1, k=4, selection="stratified",
                     reconstruction="spatial", weighting="similarity", merge="size_bias")
    path = tmp_path / "tuned.json"
    cfg.to_json(str(path))
    loaded = IPCVConfig.from_json(str(path))
    assert loaded == cfg
    spec = ViTSpec(depth=4)
    m = SyntheticViT(spec).eval()
    h, cos, sin, mask, layout = make_inputs(spec, [(5, 6)], 1, batch=2, packed=False)
    rm = rewrite(m, loaded, example_inputs=(h,), spec=LocateSpec("blocks", "attn", "mlp"), layout=layout)
    with torch.no_grad():
        out = rm(h)
        ref = m.norm(run_ipcv(h, m.branches(), loaded, layout).hidden_states)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_merge_family_is_searched_within_budget():
    """A synthetic objective that prefers gradual merging with k=3 and an early first stage; its
    cost rises with how back-loaded the schedule is.  The tuner must find the merge family, stay
    in budget (which rules out front=1.2) and return a config that validates for the depth."""
    from ipcv_core.search import merge_family_config

    def fid(cfg):
        if cfg.selection != "bipartite":
            return 0.5
        return 0.9 + 0.01 * cfg.extras["front"] + (0.02 if cfg.k == 3 else 0.0)

    def cost(cfg):
        return 0.8 + 0.2 * cfg.extras["front"] if cfg.selection == "bipartite" else 1.0

    res = tune(fid, cost, retain=0.35, depth=12)
    b = res.best
    assert b.selection == "bipartite" and b.k == 3 and b.extras["front"] == 1.0 and b.stages
    b.validate_depth(12)
    assert b == merge_family_config(0.35, 12, first=b.stages[0][0], front=1.0, k=3, merge=b.merge,
                                    placement=b.placement, every=b.extras["every"])
    assert any(c.config.extras.get("front") == 1.2 and not c.feasible for c in res.table)
    only = tune(fid, cost, retain=0.35, depth=12, families=("prune",))
    assert only.best.selection != "bipartite"


def test_reference_measured_over_budget_does_not_stop_the_search():
    """With a latency budget the reference itself can be timed a little over budget; the search
    must still move to feasible, better candidates (it used to compare against NaN and never move)."""

    def fid(cfg):
        return 0.5 + (0.1 if cfg.selection == "random" else 0.0)

    def cost(cfg):
        return 1.1 if cfg == IPCVConfig.paper(0.35) else 0.9

    res = tune(fid, cost, retain=0.35, depth=12, families=("prune",))
    assert res.best.selection == "random"


def test_merge_family_fits_the_schedule_to_the_budget():
    """The merge family's front is fitted to the budget at every structural point: with a budget
    that rules out every front above 0.8 for stages at every block (cost rises with front and with
    the number of stages), the search returns the most back-loaded schedule that fits, and with a
    larger budget (max_cost) a more back-loaded one; every returned config is within budget."""
    from ipcv_core.search import MERGE_SPACE, merge_family_config

    def fid(cfg):
        if cfg.selection != "bipartite":
            return 0.5
        return 0.9 + 0.01 * cfg.extras["front"] - 0.001 * cfg.extras["every"] + (0.005 if cfg.post_attention else 0.0)

    def cost(cfg):
        if cfg.selection != "bipartite":
            return 1.0
        return 0.6 + 0.4 * cfg.extras["front"] * (1.0 + 0.1 * len(cfg.stages) / 11)

    res = tune(fid, cost, retain=0.35, depth=12, families=("merge",))
    b = res.best
    assert cost(b) <= 1.0 and b.post_attention
    assert b.extras["front"] == max(f for f in (0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5)
                                    if cost(merge_family_config(0.35, 12, first=b.stages[0][0], front=f, k=b.k,
                                                                merge=b.merge, placement=b.placement,
                                                                every=b.extras["every"])) <= 1.0)
    more = tune(fid, cost, retain=0.35, depth=12, families=("merge",), max_cost=1.2)
    assert cost(more.best) <= 1.2 and more.best.extras["front"] > b.extras["front"]
    assert all(c.cost <= 1.2 for c in more.table if c.feasible)
