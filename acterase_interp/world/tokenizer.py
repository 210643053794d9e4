"""An offline `CLIPTokenizer` for ConceptWorld's vocabulary.

Every caption word gets a chain of BPE merges that ends in one whole-word token, so captions encode
one token per word, while a word outside the vocabulary still encodes (as characters), as in CLIP.
"""

from __future__ import annotations

import string

from transformers import CLIPTokenizer

from .captions import vocabulary

MAX_LENGTH = 24
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")


def _merges_for(word: str) -> list[tuple[str, str]]:
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    merges = []
    while len(symbols) > 1:
        merges.append((symbols[0], symbols[1]))
        symbols = [symbols[0] + symbols[1]] + symbols[2:]
    return merges


def _make(order: list[str]) -> CLIPTokenizer:
    chars = sorted(set(string.ascii_lowercase + "-,'."))
    tokens: list[str] = list(_SPECIALS) + chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in order:
        for a, b in _merges_for(word):
            if (a, b) not in merges:
                merges.append((a, b))
            if a + b not in tokens:
                tokens.append(a + b)
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(tokens)},
        merges=merges,
        model_max_length=MAX_LENGTH,
        bos_token=_SPECIALS[0],
        eos_token=_SPECIALS[1],
        pad_token=_SPECIALS[1],
        unk_token=_SPECIALS[1],
    )


def build_tokenizer() -> CLIPTokenizer:
    """The tokenizer ConceptWorld is trained with; deterministic, no files needed."""
    words = sorted({piece for w in vocabulary() for piece in w.split("-")} | {"-", ","}, key=lambda w: (-len(w), w))
    # A merge chain can lose to an earlier merge of another word's inner pair; give such words
    # priority until every word encodes whole.
    for _ in range(len(words)):
        tokenizer = _make(words)
        split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
        if not split:
            return tokenizer
        words = split + [w for w in words if w not in split]
    raise RuntimeError(f"could not give whole-word tokens to {split}")
