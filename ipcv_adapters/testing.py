"""Tiny towers and VLMs from configs (random weights, no hub), for tests, examples and benchmarks.

``tiny_tower(name)`` builds one of the supported vision towers with 4 blocks; ``TINY_IPCV`` is an
IPCV config that fits them (``l_p=1, Δ=2, k=4``; the paper defaults need >= 10 blocks).
``tiny_qwen2vl_vlm`` / ``tiny_internvl_vlm`` build whole ``...ForConditionalGeneration`` models
with a 2-layer LM (``text_layers=``), and ``*_generate_inputs`` the matching ``generate()`` keyword
arguments; ``left_pad_batch`` stacks several prompts into one left-padded batch.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ipcv_core.config import IPCVConfig

__all__ = [
    "TINY_IPCV", "TOWERS", "PACKED", "patch_dim", "tiny_tower", "tower_inputs", "qwen2vl_inputs",
    "tiny_qwen2vl_vlm", "qwen2vl_generate_inputs", "tiny_internvl_vlm", "internvl_generate_inputs",
    "VLMS", "tiny_vlm", "vlm_generate_inputs",
    "left_pad_batch",
]

TINY_IPCV = IPCVConfig(retain=0.35, prune_layer=1, as_depth=2, k=4)
TOWERS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "internvl", "dinov2", "siglip", "clip")
#: the Qwen family's packed towers (one sequence of images / frames, ``grid_thw``)
PACKED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
IMAGE_SIZE = 56  # 4 x 4 patches of 14 px
VOCAB, IMG, VID, VS, VE, BOS, EOS = 256, 250, 251, 252, 253, 254, 255


def _vision_kwargs(name: str, depth: int) -> dict:
    common = dict(hidden_size=64, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=14)
    if name == "qwen2_vl":
        return dict(depth=depth, embed_dim=64, num_heads=4, mlp_ratio=2, hidden_size=96, patch_size=14,
                    temporal_patch_size=2, spatial_merge_size=2)
    if name == "qwen2_5_vl":  # windows of 2 x 2 merge units (4 x 4 patches); full attention in every other block
        return dict(depth=depth, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=96, patch_size=14,
                    temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                    fullatt_block_indexes=list(range(1, depth, 2)))
    if name in ("qwen3_vl", "qwen3_5"):  # 16 px patches, an 8 x 8 learned position grid
        kw = dict(depth=depth, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=96, patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=64)
        if name == "qwen3_vl":
            kw["deepstack_visual_indexes"] = [1, max(1, depth - 2)] if depth > 2 else [0]
        return kw
    if name == "internvl":
        return dict(common, num_hidden_layers=depth, intermediate_size=128, use_qk_norm=True, norm_type="rms_norm",
                    layer_scale_init_value=0.1)
    if name == "dinov2":
        return dict(common, num_hidden_layers=depth, mlp_ratio=2)
    if name in ("siglip", "clip"):
        return dict(common, num_hidden_layers=depth, intermediate_size=128)
    raise ValueError(f"unknown tower {name!r}; one of {TOWERS}")


def tiny_tower(name: str, depth: int = 4, dtype: torch.dtype = torch.float32, attn: str = "sdpa", seed: int = 0):
    """A supported vision tower with random weights (eval mode)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
    from transformers.models.internvl.modeling_internvl import InternVLVisionModel
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    cls, cfg_cls = {
        "qwen2_vl": (Qwen2VisionTransformerPretrainedModel, Qwen2VLVisionConfig),
        "qwen2_5_vl": (Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLVisionConfig),
        "qwen3_vl": (Qwen3VLVisionModel, Qwen3VLVisionConfig),
        "qwen3_5": (Qwen3_5VisionModel, Qwen3_5VisionConfig),
        "internvl": (InternVLVisionModel, InternVLVisionConfig),
        "dinov2": (Dinov2Model, Dinov2Config),
        "siglip": (SiglipVisionModel, SiglipVisionConfig),
        "clip": (CLIPVisionModel, CLIPVisionConfig),
    }[name]
    cfg = cfg_cls(**_vision_kwargs(name, depth))
    torch.manual_seed(seed)
    m = cls._from_config(cfg, attn_implementation=attn, dtype=dtype).eval()
    if name == "internvl":  # post_init zeroes CLS / position embeddings: give them values
        with torch.no_grad():
            m.embeddings.cls_token.normal_(0, 1.0)
            if m.embeddings.position_embeddings is not None:
                m.embeddings.position_embeddings.normal_(0, 0.5)
    return m


def patch_dim(name: str) -> int:
    """Values per packed pixel patch (C * temporal patch * patch²) of a tiny packed tower."""
    p = _vision_kwargs(name, 2)["patch_size"]
    return 3 * 2 * p * p


def qwen2vl_inputs(grid_thw: Sequence[Sequence[int]], seed: int = 0, dtype=torch.float32, in_dim: int = 3 * 2 * 14 * 14):
    """Packed ``pixel_values (sum t*h*w, C*tps*ps*ps)`` and ``grid_thw (S, 3)`` as Qwen2-VL's processor emits."""
    g = torch.Generator().manual_seed(seed)
    n = int(sum(t * h * w for t, h, w in grid_thw))
    return torch.randn(n, in_dim, generator=g).to(dtype), torch.tensor([list(r) for r in grid_thw], dtype=torch.long)


def tower_inputs(name: str, batch: int = 2, seed: int = 0, dtype=torch.float32, size: int = IMAGE_SIZE) -> Tuple[tuple, dict]:
    """``(args, kwargs)`` for a call of ``tiny_tower(name)`` with ``batch`` images (Qwen2-VL: entries)."""
    if name in PACKED:  # ``batch`` entries: an image, a 2-frame video, then images
        grids = ([[1, 4, 6], [2, 4, 4]] + [[1, 6, 4]] * max(0, batch - 2))[:batch]
        if name == "qwen2_5_vl":  # larger than one 4 x 4-patch window
            grids = ([[1, 8, 6], [2, 4, 8]] + [[1, 6, 8]] * max(0, batch - 2))[:batch]
        pv, thw = qwen2vl_inputs(grids, seed, dtype, in_dim=patch_dim(name))
        return (pv,), {"grid_thw": thw}
    g = torch.Generator().manual_seed(seed)
    return (), {"pixel_values": torch.randn(batch, 3, size, size, generator=g).to(dtype)}


# --------------------------------------------------------------------------------------------- VLMs
#: tiny ``...ForConditionalGeneration`` models :func:`tiny_vlm` builds, and where their tower is
VLMS = {"qwen2_vl": "visual", "qwen2_5_vl": "visual", "qwen3_vl": "visual", "qwen3_5": "visual",
        "internvl": "vision_tower", "llava": "vision_tower", "llava_onevision": "vision_tower"}


def _text_config(layers: int, **extra) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0,
                **extra)


def tiny_vlm(name: str, vision_depth: int = 4, seed: int = 0, text_layers: int = 2):
    """A tiny ``...ForConditionalGeneration`` of family ``name`` (:data:`VLMS`), random weights; its
    vision tower is ``model.model.<VLMS[name]>``."""
    import transformers as tf

    mrope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
    special = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    qwen = {"qwen2_vl": (tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig, {}),
            "qwen2_5_vl": (tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig, {}),
            "qwen3_vl": (tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLConfig, dict(head_dim=16)),
            "qwen3_5": (tf.Qwen3_5ForConditionalGeneration, tf.Qwen3_5Config,
                        dict(head_dim=16, layer_types=["full_attention"] * text_layers))}
    clip_like = dict(hidden_size=64, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=14,
                     num_hidden_layers=vision_depth, intermediate_size=128)
    torch.manual_seed(seed)
    if name in qwen:
        cls, cfg_cls, text_extra = qwen[name]
        rope = dict(mrope, mrope_interleaved=True) if name.startswith("qwen3") else mrope
        vision = dict(_vision_kwargs(name, vision_depth))
        vision["hidden_size" if name == "qwen2_vl" else "out_hidden_size"] = 64  # merger output = LM width
        cfg = cfg_cls(text_config=_text_config(text_layers, rope_parameters=rope, **text_extra), vision_config=vision,
                      **special)
        return cls._from_config(cfg, attn_implementation="sdpa").eval()
    if name == "internvl":
        return tiny_internvl_vlm(vision_depth, seed, text_layers)
    text = _text_config(text_layers, model_type="qwen2")
    if name == "llava":  # LLaVA-1.5: CLIP, features of the second-to-last block, CLS dropped
        cfg = tf.LlavaConfig(vision_config=dict(clip_like, model_type="clip_vision_model"), text_config=text,
                             image_token_id=IMG, vision_feature_layer=-2, vision_feature_select_strategy="default")
        return tf.LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    if name == "llava_onevision":  # SigLIP, AnyRes tiles as the batch
        cfg = tf.LlavaOnevisionConfig(vision_config=dict(clip_like, model_type="siglip_vision_model"), text_config=text,
                                      image_token_id=IMG, video_token_id=VID, vision_feature_layer=-1,
                                      vision_feature_select_strategy="full",
                                      image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]])
        return tf.LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    raise ValueError(f"unknown VLM {name!r}; one of {tuple(VLMS)}")


def tiny_qwen2vl_vlm(vision_depth: int = 4, seed: int = 0, text_layers: int = 2):
    return tiny_vlm("qwen2_vl", vision_depth, seed, text_layers)


def qwen2vl_generate_inputs(entries: Sequence[Tuple[str, Tuple[int, int, int]]], seed: int = 0,
                            max_new_tokens: int = 4, question: Sequence[int] = (12, 13),
                            family: str = "qwen2_vl") -> Dict[str, torch.Tensor]:
    """``generate()`` kwargs for a Qwen-family prompt holding ``entries`` = ``[("image"|"video",
    (t, h, w)), ...]``, followed by the ``question`` token ids (Qwen3 family: every temporal patch
    of a video is its own vision span, as its processor emits them)."""
    ids: List[int] = [BOS, 10, 11]
    tt: List[int] = [0, 0, 0]
    for kind, (t, h, w) in entries:
        per_frame = family.startswith("qwen3") and kind == "video"
        for _ in range(t if per_frame else 1):
            n = (1 if per_frame else t) * h * w // 4  # merged tokens (spatial_merge_size 2)
            ids += [VS] + [IMG if kind == "image" else VID] * n + [VE]
            tt += [0] + [1 if kind == "image" else 2] * n + [0]
    ids += list(question)
    tt += [0] * len(question)
    input_ids = torch.tensor([ids])
    kw = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
              mm_token_type_ids=torch.tensor([tt], dtype=torch.int32), max_new_tokens=max_new_tokens, do_sample=False)
    images = [g for k, g in entries if k == "image"]
    videos = [g for k, g in entries if k == "video"]
    if images:
        kw["pixel_values"], kw["image_grid_thw"] = qwen2vl_inputs(images, seed, in_dim=patch_dim(family))
    if videos:
        kw["pixel_values_videos"], kw["video_grid_thw"] = qwen2vl_inputs(videos, seed + 1, in_dim=patch_dim(family))
    return kw


def vlm_generate_inputs(model, name: str, images: Sequence, seed: int = 0, max_new_tokens: int = 4,
                        video: Optional[Tuple[int, int, int]] = None) -> Dict[str, torch.Tensor]:
    """``generate()`` kwargs for the tiny VLM ``model`` of family ``name``: ``images`` are
    ``(t, h, w)`` patch grids (Qwen family), tile counts (InternVL), ``(height, width)`` image sizes
    (LLaVA-OneVision: 5 AnyRes tiles each) or ignored sizes (LLaVA: one 56-px image each);
    ``video``: a Qwen-family video grid."""
    if name in PACKED:
        entries = [("image", tuple(g)) for g in images] + ([("video", tuple(video))] if video else [])
        return qwen2vl_generate_inputs(entries, seed, max_new_tokens, family=name)
    if name == "internvl":
        return internvl_generate_inputs(sum(images), seed, max_new_tokens)
    g = torch.Generator().manual_seed(seed)
    if name == "llava":
        counts = [(IMAGE_SIZE // 14) ** 2] * len(images)  # patches, CLS dropped
        extra = dict(pixel_values=torch.randn(len(images), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g))
    elif name == "llava_onevision":
        extra = dict(pixel_values=torch.randn(len(images), 5, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
                     image_sizes=torch.tensor([list(s) for s in images]))
        with torch.no_grad():  # the image token count of AnyRes depends on the sizes: ask the model
            feats = model.model.get_image_features(**extra, vision_feature_layer=-1, vision_feature_select_strategy="full",
                                                   return_dict=True).pooler_output
        counts = [int(f.shape[0]) for f in feats]
    else:
        raise ValueError(f"unknown VLM {name!r}; one of {tuple(VLMS)}")
    ids = [BOS, 10]
    for c in counts:
        ids += [IMG] * c + [11]
    input_ids = torch.tensor([ids + [12, 13]])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                do_sample=False, **extra)


def tiny_internvl_vlm(vision_depth: int = 4, seed: int = 0, text_layers: int = 2):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    cfg = InternVLConfig(
        vision_config=_vision_kwargs("internvl", vision_depth),
        text_config=dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=0),
        image_token_id=IMG, downsample_ratio=0.5, image_seq_length=4,
    )
    torch.manual_seed(seed)
    m = InternVLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():
        m.model.vision_tower.embeddings.cls_token.normal_(0, 1.0)
        m.model.vision_tower.embeddings.position_embeddings.normal_(0, 0.5)
    return m


def internvl_generate_inputs(tiles: int, seed: int = 0, max_new_tokens: int = 4) -> Dict[str, torch.Tensor]:
    """``generate()`` kwargs for ``tiles`` single-tile images (4 image tokens each after pixel_shuffle)."""
    ids = [BOS, 10]
    for _ in range(tiles):
        ids += [VS] + [IMG] * ((IMAGE_SIZE // 14) ** 2 // 4) + [VE]
    input_ids = torch.tensor([ids + [12, 13]])
    g = torch.Generator().manual_seed(seed)
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                pixel_values=torch.randn(tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g),
                max_new_tokens=max_new_tokens, do_sample=False)


PAD = 0  # the tiny LMs' pad_token_id
_PER_TOKEN = ("input_ids", "attention_mask", "mm_token_type_ids")
_CONCAT = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def left_pad_batch(prompts: Sequence[Dict[str, torch.Tensor]], pad_token_id: int = PAD) -> Dict[str, torch.Tensor]:
    """Stack single-prompt ``generate()`` kwargs (from ``*_generate_inputs``) into one left-padded batch:
    per-token inputs are padded on the left (``attention_mask`` 0, ``mm_token_type_ids`` 0), visual inputs
    are concatenated in row order (the order the processors emit them); other keys come from the first."""
    width = max(p["input_ids"].shape[1] for p in prompts)
    out: Dict[str, torch.Tensor] = {k: v for k, v in prompts[0].items() if k not in _PER_TOKEN + _CONCAT}
    for key in _PER_TOKEN:
        if key not in prompts[0]:
            continue
        fill = pad_token_id if key == "input_ids" else 0
        rows = [torch.cat([torch.full((1, width - p[key].shape[1]), fill, dtype=p[key].dtype), p[key]], dim=1)
                for p in prompts]
        out[key] = torch.cat(rows, dim=0)
    for key in _CONCAT:
        parts = [p[key] for p in prompts if key in p]
        if parts:
            out[key] = torch.cat(parts, dim=0)
    return out
