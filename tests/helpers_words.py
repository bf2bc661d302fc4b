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


def fine_tune(model, tokenizer, texts: list[str], labels: list[int], steps: int,
              lr: float = 3e-3):
    """Train a transformers sequence classifier on the whole batch for ``steps`` Adam
    steps (full-batch, seeded by the caller); returns the model."""
    import torch

    batch = tokenizer(texts, return_tensors="pt", padding=True)
    target = torch.tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(**batch, labels=target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model
