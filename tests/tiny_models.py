"""Tiny randomly initialised models with real tokenizers and processors, built in a test's tmp folder (no model hub,
no binary in the repository): a BLIP-2 (OPT language model) that vLLM's CPU build serves, and a CLIP text tower.

Their weights are random, so their text is gibberish and their embeddings carry no meaning; what the tests check is
the plumbing -- config, tokenizer, image processor, weights on disk, loaded by vLLM or transformers from a local path.
"""

from __future__ import annotations

from pathlib import Path

# Words the byte-level BPE tokenizer is trained on: the vocabulary of the descriptions, so that tokens are words.
CORPUS = [
    "a bird's-eye view of many buildings in a city with relatively low brightness",
    "a black and white photo with a close up view of the brain",
    "a highly colourful photo of a market, mostly red and orange, with high contrast",
    "a satellite image of fields and a river seen from above on a sunny day",
    "a CT scan with a cross-sectional view of the body, dark background, bright bones",
    "Question: describe the content, colour, objects, brightness and viewpoint of this image. Answer:",
]
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>", "<image>", "<s>"]


def _bpe_tokenizer(vocab_size: int, wrap: bool = False):
    """A byte-level BPE tokenizer (GPT-2/OPT style) trained on :data:`CORPUS`, wrapped for transformers; ``wrap``:
    every text becomes ``<s> ... </s>``, as CLIP's tokenizer does (CLIP's text tower pools at the end token)."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS)
    if wrap:
        ids = {token: bpe.token_to_id(token) for token in ("<s>", "</s>")}
        bpe.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=list(ids.items()))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>" if wrap else "</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_tiny_blip2(path: Path, *, image_size: int = 56, query_tokens: int = 8, dtype: str = "bfloat16") -> Path:
    """A ~0.6 M-parameter BLIP-2 with an OPT language model saved to ``path`` (config, safetensors weights, tokenizer,
    ``Blip2Processor`` with a ``BlipImageProcessor`` at ``image_size`` px). Head size 64 everywhere: vLLM's CPU
    attention rejects smaller heads (16 fails)."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        OPTConfig,
    )

    tokenizer = _bpe_tokenizer(vocab_size=400)
    vocab = len(tokenizer)
    text = OPTConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=1,
        max_position_embeddings=256,
        word_embed_proj_dim=64,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Blip2Config(
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "image_size": image_size,
            "patch_size": 14,
        },
        qformer_config={
            "hidden_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 1,
            "intermediate_size": 128,
            "encoder_hidden_size": 64,
            "vocab_size": 64,
        },
        text_config=text.to_dict(),
        num_query_tokens=query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # unit-variance layers (the default std 0.02 lets no image through: every text the same)
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    model = model.to(getattr(torch, dtype)).eval()
    images = BlipImageProcessor(size={"height": image_size, "width": image_size}, do_convert_rgb=True)
    processor = Blip2Processor(image_processor=images, tokenizer=tokenizer, num_query_tokens=query_tokens)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def build_tiny_clip_text(path: Path, *, projection_dim: int = 48) -> Path:
    """A randomly initialised CLIP text tower with projection (``CLIPTextModelWithProjection``) and a real byte-level
    BPE tokenizer saved to ``path``; its text embeddings are ``projection_dim``-d."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = _bpe_tokenizer(vocab_size=400, wrap=True)
    tokenizer.model_max_length = 77
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
