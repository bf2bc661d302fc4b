"""The tokenizer keys of a merge recipe, in mergekit's format::

    tokenizer_source: union            # legacy: base | union | a model path

    tokenizer:                         # or the block (not both)
      source: union                    # base | union (the default) | a model path
      tokens:
        <|im_start|>:
          source: ./chatml-model       # that model's row of the same token
        <|im_end|>:
          source: {kind: model_token, model: ./base, token: </s>}   # or token_id: 2
          force: true                  # every model gets this row, even those that have it
        <|unused|>:
          source: {kind: zero}
      pad_to_multiple_of: 64

:func:`tokenizer_spec` turns them into the engine's TokenizerSpec; the semantics are in
:mod:`supermerge.engine.vocab`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from supermerge.engine.spec import TokenizerSpec, TokenSource, TokenSpec


class RecipeTokenSource(BaseModel):
    """A token row from another token of a model (``model_token``) or zeros (``zero``)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["model_token", "zero"]
    model: str | None = None
    token: str | None = None
    token_id: int | None = None

    @model_validator(mode="after")
    def _complete(self) -> RecipeTokenSource:
        named = (self.token is not None) + (self.token_id is not None)
        if self.kind == "zero" and (self.model is not None or named):
            raise ValueError("`kind: zero` takes no model, token or token_id")
        if self.kind == "model_token" and (self.model is None or named != 1):
            raise ValueError("`kind: model_token` needs `model` and one of `token` or "
                             "`token_id`")
        return self


class RecipeToken(BaseModel):
    """One entry of ``tokens:``: where its row comes from and whether to ``force`` it."""

    model_config = ConfigDict(extra="forbid")

    source: str | RecipeTokenSource | None = None
    force: bool = False


class RecipeTokenizer(BaseModel):
    """The ``tokenizer:`` block."""

    model_config = ConfigDict(extra="forbid")

    source: str = "union"
    tokens: dict[str, RecipeToken] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(None, ge=1)

    def located(self, locate: Callable[[str], str]) -> RecipeTokenizer:
        """A copy whose model paths are ``locate(path)`` (``base`` and ``union`` stay)."""
        def token(rule: RecipeToken) -> RecipeToken:
            src = rule.source
            if isinstance(src, str):
                src = locate(src)
            elif src is not None and src.model is not None:
                src = src.model_copy(update={"model": locate(src.model)})
            return rule.model_copy(update={"source": src})

        return self.model_copy(update={"source": locate_source(self.source, locate),
                                       "tokens": {t: token(r) for t, r in self.tokens.items()}})


def locate_source(source: str, locate: Callable[[str], str]) -> str:
    """A tokenizer ``source``: ``base`` and ``union`` as they are, a path ``locate``d."""
    return source if source in ("base", "union") else locate(source)


def tokenizer_spec(legacy: str | None, block: RecipeTokenizer | None,
                   locate: Callable[[str], str]) -> TokenizerSpec | None:
    """The engine's TokenizerSpec of ``tokenizer_source`` or ``tokenizer:`` (None for
    neither), model paths resolved by ``locate`` (as the recipe's models are)."""
    if legacy is None and block is None:
        return None
    block = (block or RecipeTokenizer(source=legacy)).located(locate)  # type: ignore[arg-type]

    def rule(token: RecipeToken) -> TokenSpec:
        src = token.source
        if src is None or isinstance(src, str):
            return TokenSpec(None if src is None else TokenSource("model", src), token.force)
        return TokenSpec(TokenSource(src.kind, src.model, src.token, src.token_id),
                         token.force)

    return TokenizerSpec(source=block.source,
                         tokens={t: rule(r) for t, r in block.tokens.items()},
                         pad_to_multiple_of=block.pad_to_multiple_of)
