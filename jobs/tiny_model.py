"""Build a tiny Llama-architecture model offline, deterministic from a seed.

Used by the demo, the tests and the benchmarks: nothing downloads a model at run time. The model
has random weights, so its text is gibberish, but it exercises the real vLLM engine end to end
(tokenizer, chat template, scheduling, sampling), and greedy decoding is deterministic.

Output directory layout (what `save_pretrained` writes; vLLM and transformers load it):
    config.json, generation_config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json, special_tokens_map.json, chat_template.jinja
"""

from __future__ import annotations

import random
from pathlib import Path

# A chat template in the usual Jinja form: vLLM and transformers render it the same way.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A fixed word list keeps the tokenizer independent of the machine (no stdlib sources, no network).
_WORDS = (
    "the a an of to in and or for with on at by from about into over after before under "
    "order invoice customer account payment refund delivery ticket support product service "
    "summarise summarize classify translate extract answer question request review report "
    "please thanks urgent late broken missing wrong charge billing shipping address email "
    "phone name date time price total amount number status priority high low medium "
    "text document context source claim fact model output input event data table batch "
    "alpha beta gamma delta kafka ray engine actor pool commit offset partition topic"
).split()


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if i % 3 == 0:
            words.append(str(rng.randint(0, 10_000)))
        if i % 5 == 0:
            words.append("".join(chr(rng.randint(33, 126)) for _ in range(6)))
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
    return out


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 4096,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    max_position_embeddings: int = 512,
) -> Path:
    """Write a tiny random LlamaForCausalLM and its tokenizer to ``out_dir``; returns the path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.convert_tokens_to_ids("<|end|>"),
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    # float32: on CPUs without bf16 instructions vLLM's bf16 path is ~4x slower (run it with
    # `model.dtype: float32`; `auto` picks bf16 on CPUs).
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    return out
