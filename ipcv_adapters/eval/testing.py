"""Tiny InternVL3 / LLaVA-OneVision checkpoints that lmms-eval's transformers wrappers load, built offline (random
weights, the BPE tokenizer of :mod:`ipcv_adapters.vllm.testing` plus the family's image tokens, a chat template,
the family's processor configs): for the lmms-eval tests (``tests_eval/``).  No hub access, no lmms-eval import.

``save_tiny_eval_vlm(family, path)`` writes a directory ``AutoProcessor`` / ``...ForConditionalGeneration``
``.from_pretrained`` load; the Qwen families are :func:`ipcv_adapters.vllm.testing.save_tiny_vlm`'s.
"""

from __future__ import annotations

import json
import os

import torch

__all__ = ["EVAL_FAMILIES", "save_tiny_eval_vlm"]

EVAL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl3", "llava_onevision")

_SIZE = 56  # 4 x 4 patches of 14 px per tile


def _template(image: str, video: str) -> str:
    """The vLLM tests' Qwen-style chat template with the family's image / video placeholders (the processor
    expands them), each on a line of its own as in the families' hub templates."""
    from ..vllm.testing import _TEMPLATE

    vis = "<|vision_start|><|{}_pad|><|vision_end|>"
    return _TEMPLATE.replace(vis.format("image"), image + "\n").replace(vis.format("video"), video + "\n")


def _tokenizer(path: str, marks: dict):
    """The vLLM tests' tiny BPE tokenizer (Qwen's special tokens, trained offline) with the family's media tokens
    added as special tokens and named attributes (``marks``: attribute -> token, e.g. ``image_token``)."""
    from transformers import PreTrainedTokenizerFast

    from ..vllm.testing import _tokenizer as qwen_tokenizer

    base = qwen_tokenizer(path, 320)
    base.add_tokens(list(dict.fromkeys(marks.values())), special_tokens=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, eos_token=base.eos_token,
                                  pad_token=base.pad_token, extra_special_tokens=marks, padding_side="left")
    return tok


def _text_config(tok, layers: int, width: int = 64, heads: int = 2) -> dict:
    return dict(model_type="qwen2", vocab_size=384, hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=1, head_dim=width // heads,
                max_position_embeddings=4096, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, tie_word_embeddings=False)


def _randomize(model) -> None:
    with torch.no_grad():  # small weights: random-init towers otherwise drift into denormals on CPU
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)


def _internvl3(path: str, vision_depth: int, text_layers: int):
    import transformers as tf

    from ..testing import _vision_kwargs

    marks = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = _tokenizer(path, marks)
    image_id = tok.convert_tokens_to_ids(marks["context_image_token"])
    cfg = tf.InternVLConfig(vision_config=_vision_kwargs("internvl", vision_depth), text_config=_text_config(tok, text_layers),
                            image_token_id=image_id, downsample_ratio=0.5, image_seq_length=(_SIZE // 14) ** 2 // 4,
                            tie_word_embeddings=False)
    model = tf.InternVLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    ip = tf.GotOcr2ImageProcessor(size={"height": _SIZE, "width": _SIZE}, crop_to_patches=True, min_patches=1,
                                  max_patches=4)
    vp = tf.InternVLVideoProcessor(size={"height": _SIZE, "width": _SIZE})
    proc = tf.InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                image_seq_length=cfg.image_seq_length, chat_template=_template("<IMG_CONTEXT>", "<video>"))
    return model, proc, tok


def _llava_onevision(path: str, vision_depth: int, text_layers: int):
    import transformers as tf

    tok = _tokenizer(path, {"image_token": "<image>", "video_token": "<video>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<image>", "<video>")}
    vision = dict(model_type="siglip_vision_model", hidden_size=64, num_attention_heads=4, image_size=_SIZE,
                  patch_size=14, num_hidden_layers=vision_depth, intermediate_size=128)
    pinpoints = [[_SIZE, _SIZE], [_SIZE, 2 * _SIZE], [2 * _SIZE, _SIZE], [2 * _SIZE, 2 * _SIZE]]
    cfg = tf.LlavaOnevisionConfig(vision_config=vision, text_config=_text_config(tok, text_layers),
                                  image_token_id=ids["<image>"], video_token_id=ids["<video>"], vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", image_grid_pinpoints=pinpoints,
                                  tie_word_embeddings=False)
    model = tf.LlavaOnevisionForConditionalGeneration._from_config(cfg, attn_implementation="sdpa")
    ip = tf.LlavaOnevisionImageProcessor(size={"height": _SIZE, "width": _SIZE}, image_grid_pinpoints=pinpoints)
    vp = tf.LlavaOnevisionVideoProcessor(size={"height": _SIZE, "width": _SIZE})
    proc = tf.LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                      num_image_tokens=(_SIZE // 14) ** 2, vision_feature_select_strategy="full",
                                      chat_template=_template("<image>", "<video>"))
    return model, proc, tok


def save_tiny_eval_vlm(family: str, path: str, *, vision_depth: int = 4, text_layers: int = 3, seed: int = 0,
                       **qwen_kwargs) -> str:
    """Write a tiny ``family`` VLM (:data:`EVAL_FAMILIES`) with random fp32 weights to ``path``; returns ``path``.
    InternVL3: ``InternVLForConditionalGeneration`` (InternViT with QK-norm, 56-px tiles, up to 4 tiles + a
    thumbnail per image, 4 tokens a tile); LLaVA-OneVision: SigLIP, AnyRes up to 2 x 2 tiles of 56 px.  Both
    language models are 64-wide Qwen2 decoders of ``text_layers`` layers."""
    if family not in EVAL_FAMILIES:
        raise ValueError(f"family must be one of {EVAL_FAMILIES}, got {family!r}")
    if family.startswith("qwen"):
        from ..vllm.testing import save_tiny_vlm

        return save_tiny_vlm(family, path, vision_depth=vision_depth, text_layers=text_layers, seed=seed, **qwen_kwargs)
    if qwen_kwargs:
        raise TypeError(f"save_tiny_eval_vlm({family!r}): unexpected arguments {sorted(qwen_kwargs)}")
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    build = _internvl3 if family == "internvl3" else _llava_onevision
    model, proc, tok = build(path, vision_depth, text_layers)
    model.eval()
    _randomize(model)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "ipcv_tiny.json"), "w") as f:
        json.dump({"family": family}, f, indent=1)
    return path
