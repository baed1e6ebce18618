"""Tiny offline models and tokenizers for tests and examples (no hub access needed).

The tokenizer is a byte-level BPE trained in milliseconds on a fixed corpus, so every string
encodes; it carries a ChatML-style chat template like SmolLM2's. The model is a randomly
initialised Llama of a few layers built from a config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human: How do I boil an egg? Assistant: Put it in boiling water for nine minutes.",
    "You are a helpful, honest and harmless assistant. Answer clearly and kindly.",
    "I cannot help with that, but here is a safer alternative you could try instead.",
    "system user assistant 0123456789 ,.;:!?'\"()[]{}<>-_=+*/\\ \n\t",
]


def tiny_tokenizer(*, chat_template: bool = True, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>" if chat_template else "<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
    )
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    fast.padding_side = "right"
    return fast


def tiny_model(
    *,
    vocab_size: int = 320,
    layers: int = 4,
    hidden: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype)


def save_tiny(path: str | Path, **kwargs) -> Path:
    """Write a tiny model and tokenizer folder that ``rahf`` can load like any local model."""
    path = Path(path)
    tokenizer = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), **kwargs)
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_toy_pairs(path: str | Path, n: int = 24) -> Path:
    """A small arithmetic preference set (plain format) for tests and examples."""
    import json

    path = Path(path)
    with open(path, "w") as handle:
        for i in range(n):
            row = {
                "prompt": f"What is {i} plus {i}?",
                "chosen": f"{i} plus {i} is {2 * i}.",
                "rejected": f"Maybe {i + 7}, who cares.",
            }
            handle.write(json.dumps(row) + "\n")
    return path


def save_step1_adapters(model_path: str | Path, root: str | Path, lora, *, std: float = 0.2) -> dict[str, str]:
    """Dual step-1 outputs for tests: ``root/<side>/adapter`` for the preferred and dispreferred
    sides (seeds 0 and 1), each a LoRA (``lora``: LoraSettings) with random non-zero B weights
    of standard deviation ``std``, so the sides differ from the base and from each other.
    Returns side -> step-1 folder, as ``load_fit_model`` takes it."""
    from rahf.models import load_model
    from rahf.trainer import add_lora

    folders = {}
    for seed, side in enumerate(("preferred", "dispreferred")):
        torch.manual_seed(seed)
        model = add_lora(load_model(str(model_path), device="cpu"), lora)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, std)
        model.save_pretrained(Path(root) / side / "adapter")
        folders[side] = str(Path(root) / side)
    return folders
