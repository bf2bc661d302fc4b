"""Cost of the tokenizer options: a linear merge of three Llama-like models whose
tokenizers differ, with ``tokenizer_source: union`` against the same merge without it
(the base's tokenizer copied, ``vocab: common_rows``).

The models (random weights; costs do not depend on the values) have a ``--vocab``-token
word-level tokenizer (the base), the same plus two chat tokens, and one whose last 1,000
tokens are renamed (so the union grows by 1,000 tokens that two models lack). Each merge is
the fastest of ``--repeats`` (robust to other load on shared machines); the table gives the
seconds and the ratio, and the time the plan alone takes to build the vocabulary.

Run: ``python benchmarks/vocab_remap.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import tokenizers
import torch
import transformers

import supermerge
from supermerge.engine import plan_merge
from supermerge.recipes import parse_recipe


def make_model(folder: Path, tokens: list[str], added: list[str], hidden: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(tokens) + len(added), hidden_size=hidden,
                                      intermediate_size=2 * hidden, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(
        {t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=tokens[0])
    tok.add_tokens(added)
    tok.save_pretrained(folder)


def fastest(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        words = ["<unk>"] + [f"w{i}" for i in range(1, args.vocab)]
        renamed = words[:-1000] + [f"x{i}" for i in range(1000)]
        make_model(root / "base", words, [], args.hidden, 0)
        make_model(root / "chat", words, ["<|im_start|>", "<|im_end|>"], args.hidden, 1)
        make_model(root / "other", renamed, [], args.hidden, 2)
        recipe = {"merge_method": "linear", "base_model": str(root / "base"),
                  "models": [str(root / n) for n in ("base", "chat", "other")]}
        union = {**recipe, "tokenizer_source": "union"}

        def merge(r):
            return lambda: supermerge.merge(r, root / "out", overwrite=True)

        plain = fastest(args.repeats, merge(recipe))
        remapped = fastest(args.repeats, merge(union))
        plan = fastest(args.repeats,
                       lambda: plan_merge(parse_recipe(union).to_spec()).close())
    print(f"| merge (vocab {args.vocab}, hidden {args.hidden}, 3 models) | seconds |")
    print("|---|---|")
    print(f"| copy the base's tokenizer (`vocab: common_rows`) | {plain:.2f} |")
    print(f"| `tokenizer_source: union` | {remapped:.2f} |")
    print(f"| of which the plan (tokenizers, row maps) | {plan:.2f} |")
    print(f"| ratio union / plain | {remapped / plain:.2f} |")


if __name__ == "__main__":
    main()
