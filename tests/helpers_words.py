"""A word-level vocabulary and tokenizer for the tiny Hugging Face models the tests train."""

from __future__ import annotations

from pathlib import Path

WORDS = ["apple", "pear", "red", "blue", "cat", "dog", "sun", "rain", "car", "tree"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB_SIZE = len(SPECIAL) + len(WORDS)


def word_tokenizer(folder: Path):
    """Return a BERT tokenizer over SPECIAL + WORDS, its vocabulary written into ``folder``."""
    import transformers

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL, *WORDS]) + "\n")
    return transformers.BertTokenizer(str(vocab))
