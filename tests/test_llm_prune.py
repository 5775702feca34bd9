"""LLM-side pruning (DART, FastV) installed by ``ipcv_adapters.compress`` on tiny random-weight VLMs
(4-layer LMs, from configs): ``generate()`` unchanged and exact at retain 1.0, pruned layers' KV cache
exactly the K rule shorter, text never removed, DART / FastV selections equal plain references, decoding
over the shorter cache equals a cache-free reference that prunes the same tokens, per-prompt isolation
in left-padded batches, with and without the IPCV tower."""

import contextlib
import math

import pytest
import torch

import ipcv_adapters
import ipcv_compile
from ipcv_adapters.llm import LLMPruneCache, uninstall
from ipcv_adapters.testing import (
    IMG, TINY_IPCV, VID, internvl_generate_inputs, left_pad_batch, qwen2vl_generate_inputs, tiny_internvl_vlm,
    tiny_qwen2vl_vlm,
)
from ipcv_core.config import num_keep
from ipcv_core.llm_prune import dart_keep, decode_mask, keep_index, last_query_attention, prefill_mask, span_budget

K = 2
NEW = 5
QWEN_CASES = {
    "one image": [("image", (1, 8, 6))],
    "two images": [("image", (1, 8, 6)), ("image", (1, 4, 4))],
    "video": [("video", (2, 4, 6))],  # 2 temporal patches -> 2 frames of 6 tokens
    "text only": [],
}
BIG = [("image", (1, 16, 12))]  # 48 tokens: DART's text pivots take part (4 + 8 pivots share 17)
BATCH = ([("image", (1, 8, 6))], [("image", (1, 4, 4)), ("video", (2, 4, 4))])


def qwen_kw(case, **kw):
    return qwen2vl_generate_inputs(QWEN_CASES[case], max_new_tokens=NEW, **kw)


def qwen_batch():
    return left_pad_batch([qwen2vl_generate_inputs(BATCH[0], max_new_tokens=NEW),
                           qwen2vl_generate_inputs(BATCH[1], max_new_tokens=NEW, question=(14, 15, 16))])


def expected_spans(entries, offset):
    """Spans of the prompt qwen2vl_generate_inputs builds: BOS, 10, 11, then per entry VS, tokens, VE."""
    spans, pos = [], offset + 3
    for kind, (t, h, w) in entries:
        pos += 1
        per = h * w // 4
        frames = 1 if kind == "image" else t
        n = per * (t if kind == "image" else 1)
        for _ in range(frames):
            spans.append((pos, n))
            pos += n
        pos += 1
    return spans


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is ~50x faster than two on a shared, loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@contextlib.contextmanager
def compressed(model, **kw):
    ipcv_adapters.compress(model, **{"vit_retain": None, **kw})
    try:
        yield model
    finally:
        uninstall(model)


def generate(model, kw):
    with torch.no_grad():
        out = model.generate(**kw, return_dict_in_generate=True)
    return out.sequences, out.cache


@pytest.fixture(scope="module")
def qwen():
    model = tiny_qwen2vl_vlm(text_layers=4)
    refs = {c: generate(model, qwen_kw(c))[0] for c in QWEN_CASES}
    refs["batch"] = generate(model, qwen_batch())[0]
    return model, refs


@pytest.fixture(scope="module")
def internvl():
    model = tiny_internvl_vlm(text_layers=4)
    kw = left_pad_batch([internvl_generate_inputs(2, max_new_tokens=NEW), internvl_generate_inputs(1, max_new_tokens=NEW)])
    return model, kw, generate(model, kw)[0]


# --------------------------------------------------------------------------------------------- core math
def dart_reference(keys, states, span, text_pos, budget, n_img=4, n_txt=4, p=1.0):
    """DART as a plain Python loop (lists, floats): pivots by key L-p norm, per pivot the least
    cosine-similar candidates; the budget spread over the pivots, image pivots first."""
    keys, states = keys.double().tolist(), states.double().tolist()
    norm = lambda v: sum(abs(x) ** p for x in v) ** (1 / p)
    cos = lambda a, b: sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
    start, n = span
    span_pos = list(range(start, start + n))
    img = sorted(sorted(span_pos, key=lambda i: -norm(keys[i]))[:min(n_img, budget)])
    txt = sorted(sorted(text_pos, key=lambda i: -norm(keys[i]))[:min(n_txt, len(text_pos))])
    kept, cand = set(img), [i for i in span_pos if i not in img]
    pivots, rest = img + txt, budget - len(img)
    for j, pv in enumerate(pivots):
        take = rest // len(pivots) + (1 if j < rest % len(pivots) else 0)
        chosen = sorted(cand, key=lambda i: cos(states[i], states[pv]))[:take]
        kept |= set(chosen)
        cand = [i for i in cand if i not in chosen]
    return sorted(kept)


@pytest.mark.parametrize("budget,n_txt", [(1, 4), (3, 4), (9, 4), (20, 4), (9, 0), (26, 2)])
def test_dart_keep_equals_reference_loop(budget, n_txt):
    g = torch.Generator().manual_seed(budget)
    keys, states = torch.randn(40, 12, generator=g), torch.randn(40, 16, generator=g)
    span, text = (5, 26), torch.tensor([0, 1, 2, 33, 34, 35, 36, 37, 38])
    got = dart_keep(keys, states, span, text, budget, 4, n_txt, 1.0)
    assert got.tolist() == dart_reference(keys, states, span, text.tolist(), budget, 4, n_txt)
    assert got.numel() == budget and bool(((got >= 5) & (got < 31)).all())
    got2 = dart_keep(keys, states, span, text, budget, 4, n_txt, 2.0)
    assert got2.tolist() == dart_reference(keys, states, span, text.tolist(), budget, 4, n_txt, p=2.0)


@pytest.mark.parametrize("kind", ["none", "bool", "float"])
def test_last_query_attention_equals_explicit_softmax(kind):
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, L, d = 2, 4, 2, 9, 8
    q, k = torch.randn(B, H, L, d, generator=g), torch.randn(B, Hkv, L, d, generator=g)
    causal = torch.ones(L, L).tril().bool()
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[1, :3] = False  # left padding of row 1
    allowed = causal[None, None] & pad[:, None, None, :]
    mask = {"none": None, "bool": allowed,
            "float": torch.zeros(B, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)}[kind]
    if kind == "none":
        allowed = causal[None, None].expand(B, 1, L, L)
    qi = torch.tensor([L - 1, L - 2])
    got = last_query_attention(q, k, mask, 0.3, qi)
    logits = q @ k.repeat_interleave(H // Hkv, dim=1).transpose(-1, -2) * 0.3
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).mean(1)  # (B, L, L)
    ref = torch.stack([probs[b, qi[b]] for b in range(B)])
    assert torch.allclose(got, ref, atol=1e-6)


def test_masks_of_kept_tokens_equal_brute_force():
    L, B = 7, 2
    pad = torch.ones(B, L, dtype=torch.bool)
    pad[0, :2] = False
    full = torch.ones(L, L).tril().bool()[None, None] & pad[:, None, None, :]
    index, valid = keep_index([torch.tensor([0, 1, 2, 5, 6]), torch.tensor([0, 3, 6])])
    got = prefill_mask(full, index, valid)
    for b in range(B):
        for i in range(index.shape[1]):
            for j in range(index.shape[1]):
                want = bool(full[b, 0, index[b, i], index[b, j]]) and bool(valid[b, j]) if valid[b, i] else i == j
                assert bool(got[b, 0, i, j]) == want
    # no mask (plain causal, no padding) but rows of different kept counts: a causal mask over the positions
    causal = torch.ones(L, L).tril().bool()[None, None].expand(B, 1, L, L)
    assert torch.equal(prefill_mask(None, index, valid), prefill_mask(causal, index, valid))
    assert prefill_mask(None, index[:1, -5:], valid[:1, -5:]) is None  # one full row: SDPA's is_causal path
    # decoding 1 token at total length L + 2: the kept prompt entries, then the 2 later tokens
    full_dec = torch.cat([pad, torch.ones(B, 2, dtype=torch.bool)], dim=1)[:, None, None, :]
    dm = decode_mask(full_dec, index, valid, L, 1, L + 2)
    assert dm.shape == (B, 1, 1, index.shape[1] + 2)
    assert dm[0, 0, 0].tolist() == [False, False, True, True, True, True, True]  # positions 0, 1 are padding
    assert dm[1, 0, 0].tolist() == [False, False, True, True, True, True, True]  # 2 fillers
    assert decode_mask(None, index[:1], valid[:1], L, 1, L + 2) is None


def test_span_budget_is_the_project_k_rule():
    for n in (1, 4, 6, 12, 1024, 1300):
        for r in (0.2, 0.35, 0.5, 0.65, 1.0):
            assert span_budget(n, r) == num_keep(n, r) == max(1, min(n, math.ceil(round(r * n, 9))))


def test_cache_batch_operations_carry_the_per_row_state():
    """Beam reordering, repeats and selection permute the call's per-row state with the cache rows; crop
    removes generated tokens only."""
    from ipcv_adapters.llm import PruneState

    cache = LLMPruneCache()
    for layer, length in ((0, 6), (1, 4)):
        cache.update(torch.arange(2.0)[:, None, None, None].expand(2, 1, length, 2).clone(),
                     torch.zeros(2, 1, length, 2), layer)
    index, valid = keep_index([torch.tensor([0, 1, 4, 5]), torch.tensor([0, 5])])
    cache.prune_state = PruneState("dart", 0.35, 1, [[(1, 3)], [(1, 4)]], 5, torch.tensor([4, 4]),
                                   keep_index=index, keep_valid=valid)
    cache.reorder_cache(torch.tensor([1, 0]))
    assert cache.prune_state.keep_valid.sum(1).tolist() == [2, 4]
    assert cache.layers[1].keys[:, 0, 0, 0].tolist() == [1.0, 0.0]
    assert cache.valid_entries(1).tolist() == [2, 4] and cache.valid_entries(0).tolist() == [6, 6]
    cache.batch_repeat_interleave(2)
    assert cache.prune_state.keep_index.shape == (4, 4) and cache.prune_state.last_index.shape == (4,)
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert cache.prune_state.keep_valid.sum(1).tolist() == [2, 4]
    cache.crop(-1)  # the one generated token
    assert cache.layer_lengths() == [5, 3]
    with pytest.raises(NotImplementedError, match="pruned prompt"):
        cache.crop(-1)


# --------------------------------------------------------------------------------------------- Qwen2-VL
@pytest.mark.parametrize("llm", ["dart", "fastv"])
@pytest.mark.parametrize("case", list(QWEN_CASES) + ["batch"])
def test_qwen_generate_equals_vanilla_at_retain_one(qwen, llm, case):
    model, refs = qwen
    kw = qwen_batch() if case == "batch" else qwen_kw(case)
    with compressed(model, llm=llm, llm_retain=1.0, llm_layer=K):
        seq, cache = generate(model, kw)
    assert torch.equal(seq, refs[case])
    if case != "text only":  # the mechanism ran: the call's cache holds its state, nothing removed
        assert isinstance(cache, LLMPruneCache) and cache.prune_state.pruned
        assert len(set(cache.layer_lengths())) == 1


@pytest.mark.parametrize("llm", ["dart", "fastv"])
@pytest.mark.parametrize("case", ["one image", "two images", "video"])
def test_qwen_pruned_cache_lengths_and_text_kept(qwen, llm, case):
    model, _ = qwen
    kw = qwen_kw(case)
    with compressed(model, llm=llm, llm_retain=0.35, llm_layer=K):
        seq, cache = generate(model, kw)
    spans = expected_spans(QWEN_CASES[case], 0)
    removed = sum(n - math.ceil(0.35 * n) for _, n in spans)
    lens = cache.layer_lengths()
    L = kw["input_ids"].shape[1]
    assert lens[:K] == [L + NEW - 1] * K
    assert lens[K:] == [L + NEW - 1 - removed] * (4 - K)
    st = cache.prune_state
    assert st.spans == [spans]
    kept = set(st.keep_index[0].tolist())
    visual = {p for s, n in spans for p in range(s, s + n)}
    assert set(range(L)) - visual <= kept  # every text / special token kept
    for s, n in spans:  # exactly ceil(r n) per image / frame
        assert len(kept & set(range(s, s + n))) == math.ceil(0.35 * n)
    assert seq.shape[1] == L + NEW


@pytest.mark.parametrize("llm", ["dart", "fastv"])
def test_qwen_batch_rows_independent(qwen, llm):
    """Left-padded batch of 2 (rows keep different counts): each row's kept tokens and generated ids equal
    the prompt run alone; the padded pruned cache has exactly each row's kept count of valid entries."""
    model, _ = qwen
    kw = qwen_batch()
    W = kw["input_ids"].shape[1]
    singles = [qwen2vl_generate_inputs(BATCH[0], max_new_tokens=NEW),
               qwen2vl_generate_inputs(BATCH[1], max_new_tokens=NEW, question=(14, 15, 16))]
    with compressed(model, llm=llm, llm_retain=0.35, llm_layer=K):
        seq, cache = generate(model, kw)
        alone = [generate(model, s) for s in singles]
    st = cache.prune_state
    for r, (s_seq, s_cache) in enumerate(alone):
        off = W - singles[r]["input_ids"].shape[1]
        assert torch.equal(seq[r, off:], s_seq[0])
        row = st.keep_index[r][st.keep_valid[r]] - off
        assert row[row >= 0].tolist() == s_cache.prune_state.keep_index[0].tolist()
        spans = expected_spans(BATCH[r], off)
        removed = sum(n - math.ceil(0.35 * n) for _, n in spans)
        assert int(cache.valid_entries(K)[r]) == W - removed + NEW - 1
        assert int(cache.valid_entries(0)[r]) == W + NEW - 1
    counts = st.kept_counts().tolist()
    assert counts[0] != counts[1] and cache.layer_lengths()[K] == max(counts) + NEW - 1


def test_qwen_beam_search_and_sampling_run_over_the_pruned_cache(qwen):
    """Beam search (cache reordered every step) and sampling with several sequences (inputs expanded
    before the prefill): exact at 1.0; at 0.35 a left-padded batch's beams equal each prompt's alone."""
    model, _ = qwen
    kw = qwen_batch()

    def run(inputs, **extra):
        torch.manual_seed(0)
        with torch.no_grad():
            return model.generate(**{**inputs, **extra})

    refs = [run(kw, num_beams=2), run(kw, do_sample=True, num_return_sequences=2)]
    with compressed(model, llm="dart", llm_retain=1.0, llm_layer=K):
        assert torch.equal(run(kw, num_beams=2), refs[0])
        assert torch.equal(run(kw, do_sample=True, num_return_sequences=2), refs[1])
    singles = [qwen2vl_generate_inputs(BATCH[0], max_new_tokens=NEW),
               qwen2vl_generate_inputs(BATCH[1], max_new_tokens=NEW, question=(14, 15, 16))]
    W = kw["input_ids"].shape[1]
    with compressed(model, llm="fastv", llm_retain=0.35, llm_layer=K):
        both = run(kw, num_beams=2)
        for r, s in enumerate(singles):
            alone = run(s, num_beams=2)
            assert torch.equal(both[r, W - s["input_ids"].shape[1]:], alone[0])


def test_qwen_unpadded_batch_rows_keeping_different_counts(qwen):
    """Two prompts of equal length (no padding: the model's mask is None, SDPA's causal path) whose rows keep
    different counts: the pruned layers get a causal mask with the short row's fillers masked."""
    model, _ = qwen
    a = qwen2vl_generate_inputs([("image", (1, 8, 6))], max_new_tokens=NEW)
    b = qwen2vl_generate_inputs([("image", (1, 4, 4))], max_new_tokens=NEW, question=tuple(range(12, 22)))
    assert a["input_ids"].shape == b["input_ids"].shape
    kw = left_pad_batch([a, b])
    assert bool(kw["attention_mask"].all())
    with compressed(model, llm="dart", llm_retain=0.35, llm_layer=K):
        seq, cache = generate(model, kw)
        alone = [generate(model, s)[0] for s in (a, b)]
    assert cache.prune_state.kept_counts().tolist() == [19 - 7, 19 - 2]
    assert torch.equal(seq[0], alone[0][0]) and torch.equal(seq[1], alone[1][0])


def _image_embeds(model, kw):
    feats = []
    with torch.no_grad():
        if "pixel_values" in kw:
            feats.append(("image", IMG, torch.cat(model.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"]).pooler_output)))
        if "pixel_values_videos" in kw:
            feats.append(("video", VID, torch.cat(model.model.get_video_features(kw["pixel_values_videos"], kw["video_grid_thw"]).pooler_output)))
    return feats


def reference_generate(model, kw, keep, steps):
    """Cache-free greedy decoding that prunes at layer K explicitly: every step runs the whole sequence;
    layers >= K see the kept prompt positions ``keep`` plus every generated token, with their original
    M-RoPE positions and a plain causal mask."""
    lm = model.model.language_model
    ids = kw["input_ids"]
    L = ids.shape[1]
    feats = _image_embeds(model, kw)
    first_logits = None
    with torch.no_grad():
        for _ in range(steps):
            T = ids.shape[1]
            tt = torch.cat([kw["mm_token_type_ids"], torch.zeros(1, T - L, dtype=torch.int32)], dim=1)
            pos, _ = model.model.get_rope_index(ids, tt, image_grid_thw=kw.get("image_grid_thw"),
                                                video_grid_thw=kw.get("video_grid_thw"))
            h = lm.embed_tokens(ids)
            for _, tok, f in feats:
                h[ids == tok] = f
            sel = torch.cat([keep, torch.arange(L, T)])
            for i, layer in enumerate(lm.layers):
                if i == K:
                    h, pos = h[:, sel], pos[:, :, sel]
                h = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos), cache=None, use_cache=False)
            logits = model.lm_head(lm.norm(h[:, -1]))
            first_logits = logits if first_logits is None else first_logits
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids, first_logits


@pytest.mark.parametrize("llm", ["dart", "fastv"])
@pytest.mark.parametrize("case", ["two images", "video"])
def test_qwen_decoding_over_short_cache_equals_cache_free_reference(qwen, llm, case):
    model, _ = qwen
    kw = qwen_kw(case)
    with compressed(model, llm=llm, llm_retain=0.35, llm_layer=K):
        seq, cache = generate(model, kw)
        fwd = {k: v for k, v in kw.items() if k not in ("max_new_tokens", "do_sample")}
        model.model.rope_deltas = None
        with torch.no_grad():
            prefill_logits = model(**fwd).logits[:, -1]
    keep = cache.prune_state.keep_index[0]
    ref, ref_logits = reference_generate(model, kw, keep, NEW)
    assert torch.equal(seq, ref)
    assert torch.allclose(prefill_logits, ref_logits, atol=1e-5)


def _capture_layer_input(model, layer_idx):
    box = {}

    def hook(module, args, kwargs):
        box["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach()

    return box, model.model.language_model.layers[layer_idx].register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("case", ["two images", "video", "big image"])
def test_qwen_dart_selection_equals_reference_loop(qwen, case):
    """DART's kept set from generate() equals the plain loop of DART's definition on the vanilla model's
    layer-(K-1) keys (after RoPE, from its cache) and the final-norm'd input of layer K; text pivots come
    from the text after the span."""
    model, _ = qwen
    entries = BIG if case == "big image" else QWEN_CASES[case]
    kw = qwen2vl_generate_inputs(entries, max_new_tokens=NEW, question=(12, 13, 14, 15, 16, 17))
    fwd = {k: v for k, v in kw.items() if k not in ("max_new_tokens", "do_sample")}
    box, h = _capture_layer_input(model, K)
    try:
        model.model.rope_deltas = None
        with torch.no_grad():
            out = model(**fwd, use_cache=True)
    finally:
        h.remove()
    keys = out.past_key_values.layers[K - 1].keys[0]           # (Hkv, L, d)
    keys = keys.permute(1, 0, 2).reshape(keys.shape[1], -1)
    with torch.no_grad():
        states = model.model.language_model.norm(box["hidden"])[0]
    L = kw["input_ids"].shape[1]
    spans = expected_spans(entries, 0)
    visual = {p for s, n in spans for p in range(s, s + n)}
    want = set(range(L)) - visual
    for s, n in spans:
        text = [p for p in range(s + n, L) if p not in visual]
        want |= set(dart_reference(keys, states, (s, n), text, math.ceil(0.35 * n)))
    with compressed(model, llm="dart", llm_retain=0.35, llm_layer=K):
        _, cache = generate(model, kw)
    assert cache.prune_state.keep_index[0].tolist() == sorted(want)


def test_qwen_fastv_ranking_equals_eager_attention_weights(qwen):
    """FastV's kept set (scores from its AttentionInterface function, SDPA everywhere else) equals the
    ranking by the eager model's layer-(K-1) attention weights: last token's row, mean over heads."""
    model, _ = qwen
    kw = qwen_kw("two images")
    fwd = {k: v for k, v in kw.items() if k not in ("max_new_tokens", "do_sample")}
    model.set_attn_implementation({"text_config": "eager"})
    try:
        model.model.rope_deltas = None
        with torch.no_grad():
            att = model(**fwd, output_attentions=True).attentions[K - 1]  # (1, H, L, L)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    score = att[0, :, -1].mean(0)
    L = kw["input_ids"].shape[1]
    spans = expected_spans(QWEN_CASES["two images"], 0)
    visual = {p for s, n in spans for p in range(s, s + n)}
    want = set(range(L)) - visual
    for s, n in spans:
        want |= set((score[s:s + n].topk(math.ceil(0.35 * n)).indices + s).tolist())
    with compressed(model, llm="fastv", llm_retain=0.35, llm_layer=K):
        assert model.config.text_config._attn_implementation == "ipcv_fastv_sdpa"
        assert model.config.vision_config._attn_implementation == "sdpa"
        _, cache = generate(model, kw)
    assert cache.prune_state.keep_index[0].tolist() == sorted(want)
    assert model.config.text_config._attn_implementation == "sdpa"  # restored by uninstall
    model.set_attn_implementation({"text_config": "eager"})  # FastV on an eager LM: same ranking
    try:
        with compressed(model, llm="fastv", llm_retain=0.35, llm_layer=K):
            assert model.config.text_config._attn_implementation == "ipcv_fastv_eager"
            _, cache = generate(model, kw)
        assert model.config.text_config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    assert cache.prune_state.keep_index[0].tolist() == sorted(want)


def test_prompt_ending_in_visual_tokens_keeps_its_last_token(qwen):
    """The next-token logits come from the last prompt token, so it is never removed: a prompt that ends
    inside an image has that image's span shortened by one (the rest keeps ceil(r (n - 1)))."""
    model, _ = qwen
    kw = qwen2vl_generate_inputs([("image", (1, 8, 6))], max_new_tokens=NEW, question=())
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        kw[key] = kw[key][:, :-1]  # drop the closing vision_end token: the prompt ends with an image token
    with torch.no_grad():
        ref = model.generate(**kw)
    with compressed(model, llm="dart", llm_retain=1.0, llm_layer=K):
        seq, _ = generate(model, kw)
    assert torch.equal(seq, ref)
    with compressed(model, llm="fastv", llm_retain=0.35, llm_layer=K):
        _, cache = generate(model, kw)
    L = kw["input_ids"].shape[1]
    st = cache.prune_state
    assert st.spans == [[(4, 11)]] and st.keep_index[0, -1].item() == L - 1
    assert cache.layer_lengths()[0] - cache.layer_lengths()[K] == 11 - math.ceil(0.35 * 11)


def tiny_qwen25vl_vlm():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from ipcv_adapters.testing import BOS, EOS, VE, VOCAB, VS

    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()


def test_qwen25vl_llm_side_through_the_same_family():
    """Qwen2.5-VL (LLM side only; IPCV's tower rewrite does not cover its windowed tower): exact at 1.0 on
    a left-padded batch with an image and a video, K-rule lengths at 0.35."""
    model = tiny_qwen25vl_vlm()
    entries = ([("image", (1, 8, 8))], [("video", (2, 4, 4))])
    kw = left_pad_batch([qwen2vl_generate_inputs(entries[0], max_new_tokens=NEW),
                         qwen2vl_generate_inputs(entries[1], max_new_tokens=NEW, question=(14, 15, 16))])
    ref, _ = generate(model, kw)
    with compressed(model, llm="dart", llm_retain=1.0, llm_layer=K):
        seq, _ = generate(model, kw)
    assert torch.equal(seq, ref)
    with compressed(model, llm="fastv", llm_retain=0.35, llm_layer=K):
        _, cache = generate(model, kw)
    W = kw["input_ids"].shape[1]
    assert [[n for _, n in row] for row in cache.prune_state.spans] == [[16], [4, 4]]
    assert cache.valid_entries(K).tolist() == [W - 10 + NEW - 1, W - 4 + NEW - 1]


def test_qwen_with_ipcv_tower(qwen):
    """The pair: IPCV in the tower + DART in the LLM.  At llm_retain 1.0 generation equals the model with
    only the IPCV tower (the LLM half is exact); at 0.35 the pruned layers are shorter; uninstall restores."""
    model, refs = qwen
    kw = qwen_kw("two images")
    original = model.model.visual
    model.model.visual = ipcv_compile.rewrite(original, TINY_IPCV.replace(retain=0.35))
    try:
        ipcv_only, _ = generate(model, kw)
    finally:
        model.model.visual = original
    assert not torch.equal(ipcv_only, refs["two images"])  # the tower's pruning reached the LM
    with compressed(model, vit_retain=0.35, vit_config=TINY_IPCV, llm="dart", llm_retain=1.0):
        assert isinstance(model.model.visual, ipcv_adapters.IPCVTower)
        seq, _ = generate(model, kw)
        ipcv_adapters.compress(model, vit_retain=0.35, vit_config=TINY_IPCV, llm="dart", llm_retain=0.35)
        seq2, cache = generate(model, kw)
    assert model.model.visual is original
    assert torch.equal(seq, ipcv_only)
    removed = sum(n - math.ceil(0.35 * n) for _, n in expected_spans(QWEN_CASES["two images"], 0))
    assert cache.layer_lengths()[0] - cache.layer_lengths()[K] == removed


def test_forward_without_cache_and_interleaved_calls_keep_no_module_state():
    """A plain forward(use_cache=False) prunes and returns no cache; two calls whose prefills and decoding
    steps interleave (InternVL, manual loop) give the same tokens as run one after the other: all
    per-call state is in each call's cache."""
    model = tiny_internvl_vlm(text_layers=4)
    a = internvl_generate_inputs(2, max_new_tokens=NEW)
    b = internvl_generate_inputs(1, seed=3, max_new_tokens=NEW)
    with compressed(model, llm="dart", llm_retain=0.35, llm_layer=K):
        fa = {k: v for k, v in a.items() if k not in ("max_new_tokens", "do_sample")}
        with torch.no_grad():
            out = model(**fa, use_cache=False)
        assert out.past_key_values is None
        assert out.logits.shape[1] == a["input_ids"].shape[1] - 2 * (4 - 2)  # 2 images of 4 tokens keep 2 each
        seq_a, _ = generate(model, a)
        seq_b, _ = generate(model, b)

        def start(kw):
            f = {k: v for k, v in kw.items() if k not in ("max_new_tokens", "do_sample")}
            with torch.no_grad():
                o = model(**f, use_cache=True)
            return [f["input_ids"], f["attention_mask"], o.past_key_values, o.logits[:, -1:].argmax(-1)]

        def step(s):
            ids, am, cache, nxt = s
            ids, am = torch.cat([ids, nxt], 1), torch.cat([am, torch.ones_like(nxt)], 1)
            with torch.no_grad():
                o = model(input_ids=nxt, attention_mask=am, cache=cache, use_cache=True)
            return [ids, am, o.past_key_values, o.logits[:, -1:].argmax(-1)]

        sa, sb = start(a), start(b)
        for _ in range(NEW - 1):
            sa, sb = step(sa), step(sb)
    got_a = torch.cat([sa[0], sa[3]], 1)
    got_b = torch.cat([sb[0], sb[3]], 1)
    assert torch.equal(got_a, seq_a) and torch.equal(got_b, seq_b)
    assert not any(hasattr(m, "prune_state") for m in model.modules())


# --------------------------------------------------------------------------------------------- InternVL
@pytest.mark.parametrize("llm", ["dart", "fastv"])
def test_internvl_batch_exact_at_one_and_pruned_lengths(internvl, llm):
    model, kw, ref = internvl
    with compressed(model, llm=llm, llm_retain=1.0, llm_layer=K):
        seq, _ = generate(model, kw)
    assert torch.equal(seq, ref)
    with compressed(model, llm=llm, llm_retain=0.35, llm_layer=K):
        seq, cache = generate(model, kw)
    st = cache.prune_state
    assert [[n for _, n in row] for row in st.spans] == [[4, 4], [4]]
    # row 0: two images of 4 -> 2 kept each; row 1 (left-padded by 6): one image
    W = kw["input_ids"].shape[1]
    assert cache.valid_entries(K).tolist() == [W - 4 + NEW - 1, W - 2 + NEW - 1]
    assert cache.layer_lengths()[0] == W + NEW - 1 and cache.layer_lengths()[K] == W - 2 + NEW - 1
    assert seq.shape == ref.shape


# --------------------------------------------------------------------------------------------- errors
def test_compress_validates_arguments(qwen):
    model, _ = qwen
    with pytest.raises(ValueError, match=r"llm_layer must be an int in \[1, num_layers - 1\] = \[1, 3\]"):
        ipcv_adapters.compress(model, vit_retain=None, llm="dart", llm_layer=4)
    with pytest.raises(ValueError, match=r"llm_layer .*\[1, 3\].* got 0"):
        ipcv_adapters.compress(model, vit_retain=None, llm="fastv", llm_layer=0)
    with pytest.raises(ValueError, match=r"llm must be one of \(None, 'dart', 'fastv'\)"):
        ipcv_adapters.compress(model, vit_retain=None, llm="sparsevlm")
    with pytest.raises(ValueError, match="llm_retain must be a number in"):
        ipcv_adapters.compress(model, vit_retain=None, llm="dart", llm_retain=0.0)
    assert ipcv_adapters.llm.installed(model) is None
    assert ipcv_adapters.compress(model, vit_retain=None, llm=None) is model  # nothing to install
    uninstall(model)
    with compressed(model, llm="dart", llm_retain=0.35, llm_layer=K):  # a cache it cannot shorten per layer
        with pytest.raises(NotImplementedError, match="needs a DynamicCache .* got StaticCache"):
            generate(model, {**qwen_kw("one image"), "cache_implementation": "static"})
    text = model.config.text_config  # flash attention needs a GPU build: pretend the LM uses it
    text._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(NotImplementedError, match=r"supports the attention implementations \('sdpa', 'eager'\)"):
            ipcv_adapters.compress(model, vit_retain=None, llm="dart")
    finally:
        text._attn_implementation_internal = "sdpa"
    assert ipcv_adapters.llm.installed(model) is None


# --------------------------------------------------------------------------------------------- harness
def test_e2e_analytic_rows_reproduce_the_papers_kv_column():
    """The harness's cost model: vanilla Qwen2-VL-7B at 1250 + 86 tokens is Table 4's 76.6 MB; the paper
    accounting (3 full-length layers for DART, ViT baselines handing K tokens to the LLM) matches every KV
    value of Table 4 it models except FastV's within 0.15 MB; the LLM side of IPCV alone is vanilla."""
    from benchmarks.e2e import analytic_rows

    rows = analytic_rows((1, 50, 100), 86, 8)
    assert abs(rows[0].kv_mb - 76.6) < 0.05 and rows[0].llm_rows == (1336, 1336)
    by = {(r.method, r.retain): r for r in rows}
    assert by[("IPCV alone", 0.35)].prefill_tf == rows[0].prefill_tf
    assert by[("IPCV + DART", 0.35)].llm_rows == (1336, 86 + math.ceil(0.35 * 1250))
    assert by[("IPCV + DART", 0.35)].total_tf < by[("DART (LLM)", 0.35)].total_tf < rows[0].total_tf
    paper = [r for r in analytic_rows((1, 50, 100), 86, 8, paper_accounting=True) if r.paper and r.method != "FastV"]
    assert len(paper) == 15
    for r in paper:
        assert abs(r.kv_mb - r.paper[1]) <= 0.15, (r.method, r.retain, r.kv_mb, r.paper)
