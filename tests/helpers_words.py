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
    """Train a classifier (anything whose output has ``logits``) with cross-entropy on the
    whole batch for ``steps`` Adam steps (seeded by the caller); returns the model."""
    import torch
    import torch.nn.functional as F

    batch = tokenizer(texts, return_tensors="pt", padding=True)
    target = torch.tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(**batch).logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model
