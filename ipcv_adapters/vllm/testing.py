"""Tiny Qwen-family VLM checkpoints that vLLM can serve, built offline (random weights, a BPE tokenizer
trained with ``tokenizers`` on a few sentences, Qwen's special tokens, a chat template, image / video
processor configs): for tests and benchmarks of the vLLM plug-in. No hub access, no vLLM import.

``save_tiny_vlm("qwen2_vl", path)`` writes a directory ``LLM(model=path)`` loads. The language model
has head size 32 (vLLM's CPU attention takes 32, 64, 80 and up); the tower's sizes are arguments.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

__all__ = ["FAMILIES", "SPECIAL", "save_tiny_vlm", "chat_prompt"]

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>")
_CORPUS = [
    "a photo of a cat sitting on a red chair next to the window",
    "describe the image in one sentence please",
    "the quick brown fox jumps over the lazy dog while two birds watch from a tree",
    "what is shown in this picture and what colour is it",
    "user assistant system you are a helpful assistant",
    "there are three apples and a green bottle on the wooden table",
    "the video shows a person walking along a beach at sunset",
] * 4

_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_prompt(text: str, images: int = 0, videos: int = 0) -> str:
    """The template's prompt for one user turn with ``images`` images and ``videos`` videos."""
    vis = "<|vision_start|><|image_pad|><|vision_end|>" * images + "<|vision_start|><|video_pad|><|vision_end|>" * videos
    return f"<|im_start|>user\n{vis}{text}<|im_end|>\n<|im_start|>assistant\n"


def _tokenizer(path: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=list(SPECIAL[1:]))
    fast.chat_template = _TEMPLATE
    return fast


def _mrope_section(head_dim: int):
    """M-RoPE's (t, h, w) split of the head's rotary half: head 32 -> [4, 6, 6], 64 -> [8, 12, 12]."""
    half = head_dim // 2
    hw = (half - half // 4) // 2
    return [half - 2 * hw, hw, hw]


def save_tiny_vlm(family: str, path: str, *, vision_depth: int = 4, vision_width: int = 64, vision_heads: int = 4,
                  mlp_ratio: int = 2, text_layers: int = 2, text_width: int = 64, text_heads: int = 2,
                  seed: int = 0, dtype: torch.dtype = torch.float32,
                  fullatt_block_indexes: Optional[Sequence[int]] = None,
                  deepstack_visual_indexes: Optional[Sequence[int]] = None, max_pixels: int = 448 * 448) -> str:
    """Write a tiny ``family`` VLM (:data:`FAMILIES`) with random weights to ``path``; returns ``path``.
    Patch 14 (Qwen3-VL: 16), merge 2, 2 frames per temporal patch; the language model's head size
    is ``text_width / text_heads`` (vLLM's CPU attention: 32, 64, 80 and up)."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    os.makedirs(path, exist_ok=True)
    tok = _tokenizer(path, 320)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    vocab = 384
    patch = 16 if family == "qwen3_vl" else 14
    head_dim = text_width // text_heads
    text = dict(vocab_size=vocab, hidden_size=text_width, intermediate_size=2 * text_width,
                num_hidden_layers=text_layers, num_attention_heads=text_heads, num_key_value_heads=1,
                head_dim=head_dim, max_position_embeddings=16384,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=_mrope_section(head_dim),
                                     **({"mrope_interleaved": True} if family == "qwen3_vl" else {})),
                tie_word_embeddings=False)
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    mlp = mlp_ratio * vision_width
    if family == "qwen2_vl":
        vision = dict(depth=vision_depth, embed_dim=vision_width, num_heads=vision_heads, mlp_ratio=mlp_ratio,
                      hidden_size=text_width,
                      patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
        cls, cfg_cls, proc_cls = tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig, tf.Qwen2VLProcessor
    elif family == "qwen2_5_vl":
        full = list(fullatt_block_indexes) if fullatt_block_indexes is not None else list(range(1, vision_depth, 2))
        vision = dict(depth=vision_depth, hidden_size=vision_width, num_heads=vision_heads, intermediate_size=mlp,
                      out_hidden_size=text_width, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=56,
                      fullatt_block_indexes=full)
        cls, cfg_cls, proc_cls = tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLProcessor
    else:
        deep = list(deepstack_visual_indexes) if deepstack_visual_indexes is not None else [1, max(1, vision_depth - 2)]
        vision = dict(depth=vision_depth, hidden_size=vision_width, num_heads=vision_heads, intermediate_size=mlp,
                      out_hidden_size=text_width, patch_size=16, temporal_patch_size=2, spatial_merge_size=2,
                      num_position_embeddings=64, deepstack_visual_indexes=deep)
        cls, cfg_cls, proc_cls = tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLConfig, tf.Qwen3VLProcessor
    torch.manual_seed(seed)
    cfg = cfg_cls(text_config=text, vision_config=vision, **special)
    model = cls._from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
    with torch.no_grad():  # small weights: random-init towers otherwise drift into denormals on CPU
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(path)
    unit = patch * 2
    size = {"shortest_edge": unit * unit, "longest_edge": max_pixels}
    img_kw = dict(patch_size=patch, merge_size=2, temporal_patch_size=2, size=size)
    image_processor = tf.Qwen2VLImageProcessor(**img_kw)
    if family == "qwen3_vl":
        video_processor = tf.Qwen3VLVideoProcessor(**img_kw)
    else:
        video_processor = tf.Qwen2VLVideoProcessor(**img_kw)
    proc = proc_cls(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                    chat_template=_TEMPLATE)
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "ipcv_tiny.json"), "w") as f:
        json.dump({"family": family, "vision": vision, "special": special}, f, indent=1)
    return path
