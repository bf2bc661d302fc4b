"""Merging models whose tokenizers differ: mergekit's ``tokenizer_source`` / ``tokenizer:``.

:func:`plan_vocab` (from headers and tokenizer files, before any weight is read) builds
the output tokenizer and, for every model of the merge, where each output token's row
lives in that model's embedding matrices. :meth:`VocabPlan.remap` then turns each model's
input embedding and output embedding (``lm_head``; a tied one is read through its input
embedding) into a matrix of the output vocabulary, before the merge method runs; every
other tensor streams as before.

The output vocabulary (``source``):

- ``base``: the base model's tokenizer (the first model's without a base);
- ``union``: the base's tokenizer plus, in model order, every token another model has
  (its ordinary tokens first, then its added tokens, as mergekit's union builds it);
- a model path: that model's tokenizer.

Tokens named under ``tokens:`` are added when the vocabulary lacks them. A tokenizer entry
whose id is not below its model's ``vocab_size`` (config.json) has no row there and counts
as absent from that model, as in mergekit; for ``base`` and ``union`` the base's added
tokens past its rows are left out of the output, as mergekit strips them (mergekit also
strips ordinary BPE entries past the rows by editing tokenizer.json; those stay here and
get the rows the rules below give).

Rows, as mergekit's ``PermutedEmbeddings`` computes them (mergekit's default; it has no
embed_slerp or zero default for missing tokens):

- a model that has the token keeps its own row, unless the token's rule is ``force``d;
- a model that lacks it gets the token's default row: the row of its ``tokens:`` source
  if one is given; else the row of the only model that has it; else the base's row if the
  base has it; else the mean of the rows of the models that have it; a token no model has
  gets zeros (with a warning);
- rows past the vocabulary (``pad_to_multiple_of``) get the mean of the model's rows.

"Models" are the distinct models of the merge, the base included. Each model's matrix is
then merged by the recipe's method like any other tensor. Difference from mergekit: a
``tokens:`` entry without ``source`` uses the automatic rule above (mergekit fails on it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from supermerge.engine.spec import MergeSpec, TokenizerSpec, TokenSource
from supermerge.errors import Problem, SupermergeError
from supermerge.io import Checkpoint
from supermerge.io.hub import resolve_cached
from supermerge.io.tokenizer import load_tokenizer, without_tokens_past

log = logging.getLogger(__name__)

VOCAB_HINTS = ("embed", "wte", "lm_head", "word_embeddings", "output.weight", "shared.weight")
"""Name fragments of tensors whose rows are indexed by the vocabulary."""


def config_vocab_size(config: dict | None) -> int | None:
    """The ``vocab_size`` of a config.json mapping (its ``text_config``'s for a multimodal
    model), or None when it has none."""
    for section in (config or {}, (config or {}).get("text_config") or {}):
        size = section.get("vocab_size") if isinstance(section, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return None


def vocab_size_change(config: dict | None, rows: int) -> dict[str, Any]:
    """The config.json keys to set for a vocabulary of ``rows`` rows: ``vocab_size``, or
    ``text_config`` with it where the model keeps it there (Llava)."""
    config = config or {}
    text = config.get("text_config")
    if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
        return {"text_config": {**text, "vocab_size": rows}}
    return {"vocab_size": rows}


def padded_rows(tokens: int, multiple: int | None) -> int:
    """``tokens`` rounded up to a multiple of ``multiple`` (unchanged for None)."""
    return tokens if not multiple else -(-tokens // multiple) * multiple


@dataclass
class _Model:
    """One distinct model of the merge: its rows and its tokens (those with a row)."""

    key: str
    checkpoint: Checkpoint
    rows: int
    vocab: dict[str, int]
    added: dict[int, Any]  # its added tokens with a row: id -> AddedToken
    spellings: set[str] = field(default_factory=set)  # as the recipe names it


@dataclass
class VocabPlan:
    """The output vocabulary and how every model's embedding rows map onto it.

    ``perms[key][i]`` is the row of output token ``i`` in model ``key`` (-1: absent);
    ``default_ids`` are the output ids with a default row, built per job as the weighted
    sum ``contributions[key] = (positions in default_ids, rows, weights)`` of the models'
    rows. Costs ``tokens`` int64 per model.
    """

    tokenizer: Any
    size: int
    rows: int
    names: frozenset[str]
    perms: dict[str, torch.Tensor]
    model_of: dict[int, str]
    forced: torch.Tensor
    default_ids: torch.Tensor
    contributions: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    warnings: list[str] = field(default_factory=list)

    def remap(self, checkpoints: list[Checkpoint], tensors: list[torch.Tensor]) -> None:
        """Replace each tensor of ``tensors`` (read from the checkpoint at the same position)
        by its matrix on the output vocabulary (``rows`` rows, the same width and dtype), in
        place, one at a time, so that about one matrix more than the inputs is resident
        (when the caller holds no other reference to them). Cost: O(rows x width) a tensor.
        """
        first = tensors[0]
        defaults = torch.zeros((len(self.default_ids), *first.shape[1:]), dtype=first.dtype)
        by_key = {}
        for checkpoint, tensor in zip(checkpoints, tensors, strict=True):
            by_key.setdefault(self.model_of[id(checkpoint)], tensor)
        for key, (positions, rows, weights) in self.contributions.items():
            defaults.index_add_(0, positions, by_key[key][rows] * weights.to(first.dtype).view(
                -1, *([1] * (first.dim() - 1))))
        del by_key, first
        for i, checkpoint in enumerate(checkpoints):
            tensor, perm = tensors[i], self.perms[self.model_of[id(checkpoint)]]
            matrix = torch.zeros((self.rows, *tensor.shape[1:]), dtype=tensor.dtype)
            matrix[self.default_ids] = defaults
            own = ((perm >= 0) & ~self.forced).nonzero().flatten()
            matrix[own] = tensor[perm[own]]
            if self.rows > self.size:
                matrix[self.size:] = matrix[:self.size].mean(dim=0)
            tensors[i] = matrix
            del tensor


def plan_vocab(merge: MergeSpec, base: Checkpoint | None, experts: list[Checkpoint],
               reference: Checkpoint, name_maps: list[dict[str, str]],
               problems: list[Problem]) -> VocabPlan | None:
    """Build the output tokenizer of ``merge.tokenizer`` and the row maps of the merge's
    checkpoints (see the module docstring); None, with the reasons added to ``problems``,
    when it cannot.

    Cost: each distinct model's tokenizer loaded once (its files, never its weights), one
    more load for the output tokenizer, and O(tokens x models) dictionary look-ups.
    """
    spec = merge.tokenizer
    assert spec is not None
    known = len(problems)  # found before: not this function's
    spelled = [(merge.base_model, base)] if base is not None else []
    spelled += zip([m.path for m in merge.models], experts, strict=True)
    models = _models(spelled, problems)
    names = _vocab_names(reference, models, experts, name_maps, problems)
    if len(problems) > known or not models:
        return None
    base_key = _key(base) if base is not None else _key(experts[0])
    try:
        tokenizer = _output_tokenizer(spec, models, base_key, problems)
    except SupermergeError as err:
        problems.append(Problem(err.message, file=err.file, fix=err.fix))
        return None
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    size = max(vocab.values()) + 1
    perms = {key: _perm(vocab, size, model.vocab) for key, model in models.items()}
    plan = VocabPlan(tokenizer=tokenizer, size=size,
                     rows=padded_rows(size, spec.pad_to_multiple_of), names=names, perms=perms,
                     model_of={id(c): _key(c) for c in [*([base] if base else []), *experts]},
                     forced=torch.zeros(size, dtype=torch.bool),
                     default_ids=torch.zeros(0, dtype=torch.long), contributions={})
    _default_rows(plan, spec, vocab, models, base_key, problems)
    log.info("output vocabulary: %d tokens, %d rows (%s)", size, plan.rows, spec.source)
    return None if len(problems) > known else plan


def _key(checkpoint: Checkpoint) -> str:
    return str(Path(checkpoint.path).resolve())


def _models(spelled: list[tuple[str | None, Checkpoint]],
            problems: list[Problem]) -> dict[str, _Model]:
    """The distinct models (base first; each with the recipe's spellings of it), each with
    its rows and its tokens below them."""
    models: dict[str, _Model] = {}
    loaded: dict[Path, Any] = {}  # tokenizer folder -> its tokenizer
    for spelling, checkpoint in spelled:
        key = _key(checkpoint)
        if key in models:
            models[key].spellings.add(str(spelling))
            continue
        rows = config_vocab_size(checkpoint.config)
        if rows is None:
            problems.append(Problem(
                "the tokenizer options need the model's vocabulary size, and its config.json "
                "has no `vocab_size`", file=str(checkpoint.path),
                fix="merge Hugging Face model folders whose config.json has `vocab_size`"))
            continue
        folder = checkpoint.model_dir
        try:
            if folder is None:
                raise SupermergeError(
                    "the tokenizer options need this model's tokenizer, and a bare weights "
                    "file has none", file=checkpoint.path,
                    fix="give the model's folder (with config.json and its tokenizer files)")
            if folder not in loaded:
                loaded[folder] = load_tokenizer(folder)
        except SupermergeError as err:
            problems.append(Problem(err.message, file=err.file, fix=err.fix))
            continue
        full = loaded[folder].get_vocab()
        vocab = {t: i for t, i in full.items() if i < rows}
        if len(vocab) < len(full):
            log.info("%s: %d tokenizer entries have no embedding row (ids >= vocab_size %d): "
                     "absent from this model", checkpoint.path, len(full) - len(vocab), rows)
        added = {i: t for i, t in loaded[folder].added_tokens_decoder.items() if i < rows}
        models[key] = _Model(key, checkpoint, rows, vocab, added, {str(spelling)})
    return models


def _vocab_names(reference: Checkpoint, models: dict[str, _Model], experts: list[Checkpoint],
                 name_maps: list[dict[str, str]], problems: list[Problem]) -> frozenset[str]:
    """The reference's tensors indexed by the vocabulary (input and output embeddings), each
    checked in every model: present (tied ones through their alias), ``vocab_size`` rows,
    the reference's width."""
    ref = models.get(_key(reference))
    if ref is None:
        return frozenset()
    names = frozenset(
        n for n in reference.names()
        if any(h in n for h in VOCAB_HINTS) and reference.info(n).is_float
        and len(reference.info(n).shape) == 2 and reference.info(n).shape[0] == ref.rows)
    if not names:
        problems.append(Problem(
            f"no embedding matrix with `vocab_size` ({ref.rows}) rows found", file=str(
                reference.path), fix="check config.json's `vocab_size` against the embeddings"))
    for checkpoint, mapping in [(reference, {n: n for n in names}),
                                *zip(experts, name_maps, strict=True)]:
        model = models.get(_key(checkpoint))
        for name in sorted(names):
            actual = mapping.get(name)
            shape = None if actual is None else tuple(checkpoint.info(actual).shape)
            wanted = (model.rows, reference.info(name).shape[1]) if model else None
            if model is not None and shape != wanted:
                problems.append(Problem(
                    f"embedding {'missing' if shape is None else f'of shape {shape}'}: the "
                    f"tokenizer options need shape {wanted} (its `vocab_size` rows, the "
                    "reference's width)", file=str(checkpoint.path), tensor=actual or name,
                    fix="merge fine-tunes of one architecture whose config.json `vocab_size` "
                    "matches their embeddings"))
    return names


def _output_tokenizer(spec: TokenizerSpec, models: dict[str, _Model], base_key: str,
                      problems: list[Problem]) -> Any:
    """The output tokenizer: a fresh load (ours to change) of the source's tokenizer (the
    base's without the added tokens past its rows, as mergekit strips them), the union's
    tokens and the ``tokens:`` added."""
    if spec.source in ("base", "union"):
        base = models[base_key]
        tokenizer = without_tokens_past(load_tokenizer(base.checkpoint.model_dir), base.rows)
    else:
        folder = _source_folder(spec.source, models)
        if folder is None:
            problems.append(Problem(f"tokenizer source {spec.source!r} is neither `base`, "
                                    "`union` nor a model folder", file=spec.source,
                                    fix="name a model folder with tokenizer files"))
            return None
        tokenizer = load_tokenizer(folder)
    if spec.source == "union":
        _add_union(tokenizer, models)
    have = set(tokenizer.get_vocab())
    missing = [t for t in spec.tokens if t not in have]
    if missing:
        tokenizer.add_tokens(missing)
    return tokenizer


def _source_folder(source: str, models: dict[str, _Model]) -> Path | None:
    """The tokenizer folder of a ``source``: a merged model's, any model folder, or a hub
    id's snapshot in the local cache."""
    model = _find(source, models)
    if model is not None:
        return model.checkpoint.model_dir
    return Path(source) if Path(source).is_dir() else resolve_cached(source)


def _find(path: str, models: dict[str, _Model]) -> _Model | None:
    """The merged model ``path`` names: as the recipe spells it, or the same folder."""
    spelled = next((m for m in models.values() if path in m.spellings), None)
    return spelled or models.get(str(Path(path).resolve()))


def _add_union(tokenizer: Any, models: dict[str, _Model]) -> None:
    """Add, model by model (base first), the ordinary tokens the tokenizer lacks, then the
    added tokens (each with its first model's settings: special, stripping)."""
    have = set(tokenizer.get_vocab())
    ordinary, added = [], {}
    for model in models.values():
        contents = {t.content for t in model.added.values()}
        ordinary += [t for t, _ in sorted(model.vocab.items(), key=lambda kv: kv[1])
                     if t not in contents and t not in have]
        for token in model.added.values():
            added.setdefault(token.content, token)
    ordinary = list(dict.fromkeys(ordinary))
    if ordinary:
        tokenizer.add_tokens(ordinary)
    have = set(tokenizer.get_vocab())
    new = [t for c, t in added.items() if c not in have]
    if new:
        tokenizer.add_tokens(new)


def _perm(vocab: dict[str, int], size: int, model_vocab: dict[str, int]) -> torch.Tensor:
    """Output id -> the token's row in the model (-1: absent). Cost: one look-up a token."""
    perm = torch.full((size,), -1, dtype=torch.long)
    perm[torch.tensor(list(vocab.values()), dtype=torch.long)] = torch.tensor(
        [model_vocab.get(token, -1) for token in vocab], dtype=torch.long)
    return perm


def _default_rows(plan: VocabPlan, spec: TokenizerSpec, vocab: dict[str, int],
                  models: dict[str, _Model], base_key: str, problems: list[Problem]) -> None:
    """Fill ``plan.default_ids``, ``contributions`` and ``forced`` by the rules of the
    module docstring. Cost: one pass over the vocabulary in torch, then Python work only
    for the tokens some model lacks and the ``tokens:`` entries."""
    keys = list(models)
    present_in = torch.stack([plan.perms[k] >= 0 for k in keys])  # models x tokens
    token_of = {i: t for t, i in vocab.items()}
    wanted = set((~present_in.all(dim=0)).nonzero().flatten().tolist()) & set(token_of)
    wanted |= {vocab[t] for t in spec.tokens}
    ids: list[int] = []
    parts: dict[str, tuple[list[int], list[int], list[float]]] = {}

    def take(key: str, row: int, weight: float = 1.0) -> None:
        positions, rows, weights = parts.setdefault(key, ([], [], []))
        positions.append(len(ids) - 1)
        rows.append(row)
        weights.append(weight)

    for index in sorted(wanted):
        token = token_of[index]
        rule = spec.tokens.get(token)
        present = [k for k, has in zip(keys, present_in[:, index].tolist(), strict=True) if has]
        ids.append(index)
        if rule is not None and rule.force:
            plan.forced[index] = True
        if rule is not None and rule.source is not None:
            found = _rule_row(rule.source, token, index, plan, models, problems)
            if found is not None:
                take(*found)
        elif len(present) == 1 or (present and base_key in present):
            key = present[0] if len(present) == 1 else base_key
            take(key, int(plan.perms[key][index]))
        elif present:
            for key in present:
                take(key, int(plan.perms[key][index]), 1.0 / len(present))
        else:
            plan.warnings.append(f"token {token!r} is in no model: its row is zeros")
    plan.default_ids = torch.tensor(ids, dtype=torch.long)
    plan.contributions = {k: (torch.tensor(p, dtype=torch.long),
                              torch.tensor(r, dtype=torch.long), torch.tensor(w))
                          for k, (p, r, w) in parts.items()}


def _rule_row(source: TokenSource, token: str, index: int, plan: VocabPlan,
              models: dict[str, _Model], problems: list[Problem]) -> tuple[str, int] | None:
    """(model key, row) of a ``tokens:`` source, or None for ``zero`` (and for a problem)."""
    if source.kind == "zero":
        return None
    model = _find(source.model or "", models)
    if model is None:
        problems.append(Problem(f"`tokens: {token}` takes its row from {source.model!r}, "
                                "which is not a model of this merge", file=source.model,
                                fix="name the base or one of the models (the same path)"))
        return None
    if source.kind == "model":
        row = int(plan.perms[model.key][index])
    elif source.token is not None:
        row = model.vocab.get(source.token, -1)
    else:
        row = source.token_id if source.token_id is not None and 0 <= source.token_id < (
            model.rows) else -1
    if row < 0:
        wanted = source.token if source.token is not None else source.token_id
        what = repr(wanted if source.kind == "model_token" else token)
        problems.append(Problem(f"`tokens: {token}`: {what} has no row in this model "
                                f"({model.rows} rows)", file=str(model.checkpoint.path),
                                fix="name a token (or `token_id`) this model has"))
        return None
    return model.key, row
