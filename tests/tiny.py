"""Tiny random-initialised models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
)

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=256,
)

CONFIGS = {
    "llama": lambda: LlamaConfig(**COMMON, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=None),
    "qwen2": lambda: Qwen2Config(**COMMON, num_key_value_heads=2),
    "qwen2_moe": lambda: Qwen2MoeConfig(
        **COMMON,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
    ),
    # every layer slides (Mistral's form: a window, no layer types): one windowed mask
    "mistral_sliding": lambda: MistralConfig(**COMMON, num_key_value_heads=2, sliding_window=5),
    # the same, carrying a flag Mistral never reads (Qwen-style configs do): it still slides
    "mistral_flagged": lambda: MistralConfig(
        **COMMON, num_key_value_heads=2, sliding_window=5, use_sliding_window=False
    ),
    # full and sliding layers (Qwen2's form: windows from max_window_layers on): a mask per type
    "qwen2_sliding": lambda: Qwen2Config(
        **COMMON,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=5,
        max_window_layers=1,
    ),
    "gemma3_text": lambda: Gemma3TextConfig(
        **COMMON,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=6,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    ),
    "bert": lambda: BertConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
}
# the map-replay families; the "_sliding" variants are there for the prefix tier's windows
FAMILIES = [f for f in CONFIGS if not f.endswith("_sliding")]


class TinyTokenizer:
    """Just enough tokenizer for the cache: pad id, vocab and special tokens."""

    pad_token_id = 0
    all_special_tokens = ["<pad>"]

    def get_vocab(self):
        return {f"t{i}": i for i in range(128)}

    def __call__(self, text: str, add_special_tokens: bool = True):
        """Characters as tokens (ids 1..127): enough to run text workloads through tiny models."""
        return {"input_ids": [1 + ord(c) % 127 for c in text]}


def tiny_model(family: str, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    cfg = CONFIGS[family]()
    cls = AutoModel if family == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    model.eval()
    model.attncache_name = f"tiny-{family}"
    return model


def random_seqs(n: int, lo: int = 5, hi: int = 20, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        L = int(torch.randint(lo, hi + 1, (1,), generator=g))
        out.append(torch.randint(1, 128, (L,), generator=g).tolist())
    return out


def char_tokenizer():
    """A real (fast, savable) Hugging Face tokenizer: one token per printable character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{chr(i): i - 30 for i in range(32, 127)}, "\n": 97}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(".|\n"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


SENTENCEPIECE_TEXT = [
    "Question: what is the answer?\nAnswer: A",
    "Answer: B. the cat sat on the mat",
    "A B C D the answer is",
]


def sentencepiece_tokenizer(append_eos: bool = False):
    """A tokenizer that treats the start of every string as Llama's SentencePiece does: a '▁'
    word-boundary piece is prepended (" A" alone is ['▁', '▁A']; "Answer: A" ends in '▁A'), a BOS
    in front, optionally an EOS after. Trained here, offline, on a few lines (ids < 128)."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace("▁", prepend_scheme="never", split=True),
            pre_tokenizers.Punctuation(),
        ]
    )
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCD .,:?\n▁")
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<unk>", "<s>", "</s>"], initial_alphabet=alphabet
    )
    tok.train_from_iterator(SENTENCEPIECE_TEXT * 50, trainer)
    single = "<s> $A </s>" if append_eos else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )


def save_tiny_hf(family: str, folder, max_positions: int = 512, tokenizer=None):
    """A tiny random model with a character tokenizer (or ``tokenizer``) as an ordinary HF folder:
    loadable by name (a path) by the CLI, workflows and benchmark scripts, so they run end to end
    in seconds."""
    torch.manual_seed(0)
    cfg = CONFIGS[family]()
    cfg.max_position_embeddings = max_positions
    cls = AutoModel if family == "bert" else AutoModelForCausalLM
    model = cls.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    model.save_pretrained(folder)
    (tokenizer or char_tokenizer()).save_pretrained(folder)
    return folder
