"""Tokenizers of model folders, read and written through transformers.

A tokenizer is loaded from a private copy of the folder's tokenizer files (the allow-list
TOKENIZER_FILE_PATTERNS, links followed only inside the folder, as the writer copies side
files), so loading one never opens a path outside the model folder and never runs remote
code.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from supermerge.errors import CheckpointError
from supermerge.io.guard import TOKENIZER_FILE_PATTERNS
from supermerge.io.writer import side_file_source

_DEFINING = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
             "vocab.json", "vocab.txt")


def has_tokenizer(model_dir: Path | None) -> bool:
    """Whether ``model_dir`` holds a tokenizer's vocabulary file (tokenizer.json, a
    sentencepiece model, vocab.json or vocab.txt). Costs a few ``stat`` calls."""
    return model_dir is not None and any((Path(model_dir) / n).is_file() for n in _DEFINING)


def load_tokenizer(model_dir: Path) -> Any:
    """Return the fast tokenizer (transformers) of the model folder ``model_dir``.

    Raises CheckpointError naming the folder when it holds no tokenizer, transformers
    cannot load it or is not installed (the ``hf`` extra), and naming the file when one
    of its tokenizer files links out of the folder (never followed). Cost: a copy of the
    tokenizer files into a temporary folder and one ``AutoTokenizer.from_pretrained``.
    """
    try:
        import transformers
    except ImportError:
        raise CheckpointError("reading a tokenizer needs transformers, which is not installed",
                              file=model_dir, fix="pip install 'supermerge[hf]'") from None
    model_dir = Path(model_dir)
    if not has_tokenizer(model_dir):
        raise CheckpointError(
            "this model folder has no tokenizer files (tokenizer.json, tokenizer.model, "
            "vocab.json or vocab.txt), which the recipe's tokenizer options need",
            file=model_dir,
            fix="copy the tokenizer files of the model it was fine-tuned from into this "
            "folder, or remove `tokenizer_source` / `tokenizer` from the recipe (the base's "
            "tokenizer is then copied)")
    with tempfile.TemporaryDirectory(prefix="supermerge-tok-") as tmp:
        for pattern in (*TOKENIZER_FILE_PATTERNS, "config.json"):
            for entry in model_dir.glob(pattern):
                source = side_file_source(entry, model_dir)
                if source is None:
                    raise CheckpointError(
                        f"{entry.name} links out of the model folder or is no regular file: "
                        "not read", file=entry,
                        fix="replace the link with a copy of the file it points to")
                shutil.copyfile(source, Path(tmp) / entry.name)
        try:
            return transformers.AutoTokenizer.from_pretrained(
                tmp, use_fast=True, trust_remote_code=False)
        except Exception as err:  # transformers raises many types for a bad tokenizer
            raise CheckpointError(
                f"transformers cannot load this folder's tokenizer: {err}", file=model_dir,
                fix="repair or replace its tokenizer files (AutoTokenizer.from_pretrained "
                "must load them)") from None


def tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """Return {file name: bytes} of the files ``tokenizer.save_pretrained`` writes (as the
    transformers version installed saves them: tokenizer.json, tokenizer_config.json and,
    where it writes them, special_tokens_map.json, the chat template). Cost: one save into
    a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="supermerge-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def without_tokens_past(tokenizer: Any, rows: int) -> Any:
    """Return ``tokenizer`` without its added tokens whose ids are not below ``rows`` (the
    entries a tokenizer lists past its model's embedding rows: unused), or ``tokenizer``
    itself when it has none (or is no fast tokenizer). Its ordinary vocabulary stays.

    The tokenizers library rebuilds it (the same model, normalizer, pre-tokenizer,
    post-processor and decoder; the kept added tokens re-added in id order, so their ids
    stay) and transformers reloads it beside the original's tokenizer_config.json. Cost:
    one save and one load of the tokenizer.
    """
    import tokenizers
    import transformers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    added = backend.get_added_tokens_decoder() if backend is not None else {}
    if all(index < rows for index in added):
        return tokenizer
    rebuilt = tokenizers.Tokenizer(backend.model)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
        if getattr(backend, part) is not None:
            setattr(rebuilt, part, getattr(backend, part))
    for index, token in sorted(added.items()):
        if index < rows:
            (rebuilt.add_special_tokens if token.special else rebuilt.add_tokens)([token])
    with tempfile.TemporaryDirectory(prefix="supermerge-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        rebuilt.save(str(Path(tmp) / "tokenizer.json"))
        return transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True,
                                                          trust_remote_code=False)
