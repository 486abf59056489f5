"""A tiny SmolVLM backbone generated offline: config, processor and tokenizer.

SmolVLA never needs VLM *weights* when `load_vlm_weights=False`, but it always
reads the VLM's config, processor and tokenizer by name. This module writes
those three into a directory so the real LeRobot code path runs with no hub.
Nothing here exists in LeRobot or transformers (they only download), hence
written by hand.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# Special tokens SmolVLM's processor and SmolVLA look up by attribute name.
SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "bos_token": "<|im_start|>",
    "eos_token": "<end_of_utterance>",
}
EXTRA_SPECIAL_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}


@dataclass(frozen=True)
class TinyVLMSpec:
    """Sizes of the generated backbone (defaults: ~1 M parameters, 64 px)."""

    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 4
    image_size: int = 64
    patch_size: int = 8
    scale_factor: int = 2
    vocab_size: int = 512
    # None: 4 x hidden. Set both (and embedding_rows) to reproduce a real backbone's shape.
    text_intermediate: int | None = None
    vision_intermediate: int | None = None
    # Rows of the text embedding table; None: the tokenizer's size.
    embedding_rows: int | None = None

    @property
    def image_seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


# The shape of SmolVLM2-500M-Video-Instruct, the backbone of lerobot/smolvla_base
# (random weights): with SmolVLA's defaults it gives the same 450,046,176
# parameters, so real-size cost can be measured with no download.
SMOLVLM2_500M_SHAPE = TinyVLMSpec(
    text_hidden=960, text_intermediate=2560, text_layers=32, text_heads=15, text_kv_heads=5,
    vision_hidden=768, vision_intermediate=3072, vision_layers=12, vision_heads=12,
    image_size=512, patch_size=16, scale_factor=4, vocab_size=512, embedding_rows=49280,
)


def _train_tokenizer(corpus: list[str], vocab_size: int):
    """A small byte-level BPE trained on `corpus`, wrapped as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*SPECIAL_TOKENS.values(), *EXTRA_SPECIAL_TOKENS.values()]))
    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        model_max_length=2048,
        extra_special_tokens=EXTRA_SPECIAL_TOKENS,
        **SPECIAL_TOKENS,
    )


def write_tiny_vlm(out_dir: str | Path, instructions: list[str], spec: TinyVLMSpec = TinyVLMSpec()) -> Path:
    """Write a SmolVLM config + processor + tokenizer whose vocabulary covers `instructions`."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Every word of every instruction must be representable; newline too (SmolVLA appends one).
    corpus = [*instructions, *[s + "\n" for s in instructions]]
    tokenizer = _train_tokenizer(corpus, spec.vocab_size)
    vocab = len(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(EXTRA_SPECIAL_TOKENS["image_token"])

    config = SmolVLMConfig(
        image_token_id=image_token_id,
        scale_factor=spec.scale_factor,
        pad_token_id=tokenizer.pad_token_id,
        text_config={
            "model_type": "llama",
            "vocab_size": max(vocab, spec.embedding_rows or 0),
            "hidden_size": spec.text_hidden,
            "intermediate_size": spec.text_intermediate or spec.text_hidden * 4,
            "num_hidden_layers": spec.text_layers,
            "num_attention_heads": spec.text_heads,
            "num_key_value_heads": spec.text_kv_heads,
            "head_dim": spec.text_hidden // spec.text_heads,
            "max_position_embeddings": 1024,
            "pad_token_id": tokenizer.pad_token_id,
            "rms_norm_eps": 1e-5,
        },
        vision_config={
            "hidden_size": spec.vision_hidden,
            "intermediate_size": spec.vision_intermediate or spec.vision_hidden * 4,
            "num_hidden_layers": spec.vision_layers,
            "num_attention_heads": spec.vision_heads,
            "image_size": spec.image_size,
            "patch_size": spec.patch_size,
        },
    )
    size = {"longest_edge": spec.image_size}
    processor = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(size=size, max_image_size=size, do_image_splitting=False),
        video_processor=SmolVLMVideoProcessor(size=size, max_image_size=size),
        tokenizer=tokenizer,
        image_seq_len=spec.image_seq_len,
    )
    config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (out_dir / "kuavo_tiny_vlm.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out_dir
