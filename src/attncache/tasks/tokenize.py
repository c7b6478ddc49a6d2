"""A prompt and its choices as tokens, by lm-evaluation-harness's rule, so that a score here is
the score lm-eval computes for the same prompt.

lm-eval (``TemplateLM._encode_pair``) moves the context's trailing whitespace onto the
continuation, encodes context + continuation whole and takes the continuation's tokens as what
follows the context's own encoding. Encoding a choice alone differs wherever a tokenizer treats
the start of a string specially: a SentencePiece tokenizer prepends a word-boundary piece ('▁')
to every string, so " A" alone is two pieces where "...Answer: A" ends in one; a tokenizer with a
post-processor adds its BOS/EOS to the choice. Special tokens follow the tokenizer's defaults, as
lm-eval 0.4.13's HF backend does (a BOS is kept; none is added when the text already starts with
it). One deliberate difference: special tokens a tokenizer *appends* (an EOS after every
encoding) are dropped before the split; lm-eval would split after the context's EOS and lose the
continuation's first token.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PairEncoder:
    tokenizer: object
    _trailing: int = field(init=False, default=0)  # special tokens the tokenizer appends
    _bos_text: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        plain = self._raw("a", False)
        full = self._raw("a", True)
        start = next(
            (i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain),
            None,
        )
        if start is not None:
            self._trailing = len(full) - start - len(plain)
            decode = getattr(self.tokenizer, "decode", None)
            if start > 0 and decode is not None:
                self._bos_text = decode(full[:start]) or None

    def _raw(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode(self, text: str) -> list[int]:
        """``text`` with the special tokens the tokenizer puts in front (none when ``text``
        already starts with them), none after."""
        special = not (self._bos_text and text.startswith(self._bos_text))
        ids = self._raw(text, special)
        return ids[: len(ids) - self._trailing] if special and self._trailing else ids

    def choices(self, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
        """The context's tokens and each continuation's, split as lm-eval splits them."""
        stripped = context.rstrip()
        moved = context[len(stripped) :]
        head = self.encode(stripped)
        return head, [self.encode(stripped + moved + c)[len(head) :] for c in continuations]
