"""Tokenizers in merge recipes, as mergekit means them (issue 17, item 2): the structures
of the configs in mergekit's tests/test_tokenizer.py on tiny Llama models whose
tokenizers differ, each merged, loaded in transformers and checked row by row against a
hand-computed oracle (which row each model contributes for each token)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import supermerge
from supermerge.engine.spec import TokenizerSpec, TokenSource, TokenSpec
from supermerge.errors import PlanError, RecipeError
from supermerge.recipes import parse_recipe

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ["<unk>", "<s>", "</s>"]
ORDINARY = [f"_tok_{i}" for i in range(3, 64)]
CHATML = ["<|im_start|>", "<|im_end|>"]
UNUSED = [f"<UNUSED_{i}>" for i in range(4)]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def make_tokenizer(tokens: list[str], added: list[str]):
    """A word-level tokenizer over ``tokens`` (ids in that order) plus ``added`` tokens,
    built with the tokenizers library and wrapped by transformers."""
    model = tokenizers.models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                               bos_token="<s>", eos_token="</s>")
    tok.add_tokens(added)
    return tok


def make_model(folder: Path, rows: int, tokens: list[str], added: list[str], seed: int,
               tied: bool = False) -> Path:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    make_tokenizer(tokens, added).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """base: 64 tokens; chatml: + <|im_start|>, <|im_end|> (66 rows); padded: 4 added
    tokens past its 64 rows (unused); chatml2: chatml's tokens in another order (its
    ordinary tokens reversed, the chat tokens swapped); tied: chatml with tied embeddings;
    short: the base's first 60 tokens only."""
    root = tmp_path_factory.mktemp("tok_models")
    base_tokens = SPECIAL + ORDINARY
    return {
        "base": make_model(root / "base", 64, base_tokens, [], seed=0),
        "chatml": make_model(root / "chatml", 66, base_tokens, CHATML, seed=1),
        "padded": make_model(root / "padded", 64, base_tokens, UNUSED, seed=2),
        "chatml2": make_model(root / "chatml2", 66, SPECIAL + ORDINARY[::-1], CHATML[::-1],
                              seed=3),
        "tied": make_model(root / "tied", 66, base_tokens, CHATML, seed=4, tied=True),
        "short": make_model(root / "short", 60, base_tokens[:60], [], seed=5),
    }


class Rows:
    """A model folder's tensors and vocabulary: ``row(tensor, token)``."""

    def __init__(self, folder: Path) -> None:
        self.tensors = {}
        for file in sorted(Path(folder).glob("*.safetensors")):
            self.tensors.update(load_file(str(file)))
        self.vocab = transformers.AutoTokenizer.from_pretrained(folder).get_vocab()

    def row(self, tensor: str, token: str) -> torch.Tensor:
        if tensor not in self.tensors:  # tied: the output embedding is the input one
            tensor = EMBED
        return self.tensors[tensor][self.vocab[token]].float()


def run(tmp_path, models, names, base="base", method="linear", **extra) -> Path:
    recipe = {"merge_method": method, "base_model": str(models[base]), "dtype": "float32",
              "models": [{"model": str(models[n]), "parameters": {"weight": 1.0}}
                         for n in names], **extra}
    out = tmp_path / "out"
    supermerge.merge(recipe, out)
    return out


def loads(out: Path, tokens: int, rows: int | None = None):
    """The output loads in transformers (model and tokenizer), has ``tokens`` tokens and
    ``rows`` embedding rows (config and tensors), and runs a forward pass and generates."""
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok.get_vocab()) == tokens
    rows = rows or tokens
    assert model.config.vocab_size == rows
    assert model.get_input_embeddings().weight.shape[0] == rows
    ids = tok(" ".join(["<s>", "_tok_5", "_tok_9", *[t for t in CHATML if t in tok.get_vocab()]]),
              return_tensors="pt").input_ids
    assert (ids != tok.unk_token_id).all()
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], rows)
    generated = model.generate(ids, max_new_tokens=3, do_sample=False,
                               pad_token_id=tok.eos_token_id)
    assert generated.shape == (1, ids.shape[1] + 3)
    return tok


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


# -- mergekit's tests/test_tokenizer.py structures ------------------------------------------


def test_legacy_no_tokenizer_option_copies_the_base_tokenizer(tmp_path, models):
    out = run(tmp_path, models, ["base", "padded", "chatml"])
    tok = loads(out, 64)
    assert len(tok.added_tokens_decoder) == 3
    for name in ("tokenizer.json", "tokenizer_config.json"):  # byte copies, as before
        assert (out / name).read_bytes() == (models["base"] / name).read_bytes()


def test_source_base(tmp_path, models):
    out = run(tmp_path, models, ["base", "padded", "chatml"], tokenizer_source="base")
    tok = loads(out, 64)
    assert len(tok.added_tokens_decoder) == 3
    got, rows = Rows(out), [Rows(models[n]) for n in ("base", "padded", "chatml")]
    for tensor in (EMBED, HEAD):
        for token in ("<s>", "_tok_7", "_tok_63"):  # every model has them: their mean
            close(got.row(tensor, token), sum(r.row(tensor, token) for r in rows) / 3)


def test_source_union(tmp_path, models):
    out = run(tmp_path, models, ["base", "padded", "chatml"], tokenizer_source="union")
    tok = loads(out, 66)
    assert len(tok.added_tokens_decoder) == 5
    assert not set(UNUSED) & set(tok.get_vocab())  # past padded's rows: not its tokens
    got, chatml = Rows(out), Rows(models["chatml"])
    base, padded = Rows(models["base"]), Rows(models["padded"])
    for tensor in (EMBED, HEAD):
        for token in CHATML:  # only chatml has them: every model gets chatml's row
            close(got.row(tensor, token), chatml.row(tensor, token))
        close(got.row(tensor, "_tok_30"), (base.row(tensor, "_tok_30") + padded.row(
            tensor, "_tok_30") + chatml.row(tensor, "_tok_30")) / 3)


@pytest.mark.parametrize("source, tokens", [("base", 64), ("union", 66)])
def test_a_base_tokenizer_listing_tokens_past_its_rows_is_stripped(tmp_path, models, source,
                                                                    tokens):
    """padded lists 4 added tokens past its 64 rows: as mergekit, the output (base or
    union with padded as the base) leaves them out."""
    out = run(tmp_path, models, ["padded", "chatml"], base="padded", tokenizer_source=source)
    tok = loads(out, tokens)
    assert not set(UNUSED) & set(tok.get_vocab())
    assert tok.convert_tokens_to_ids("</s>") == 2 and tok.eos_token == "</s>"
    got, padded, chatml = Rows(out), Rows(models["padded"]), Rows(models["chatml"])
    close(got.row(EMBED, "_tok_8"), (padded.row(EMBED, "_tok_8") + chatml.row(EMBED,
                                                                              "_tok_8")) / 2)


def test_source_model(tmp_path, models):
    out = run(tmp_path, models, ["base", "padded", "chatml"],
              tokenizer_source=str(models["chatml"]))
    tok = loads(out, 66)
    assert tok.get_vocab() == transformers.AutoTokenizer.from_pretrained(
        models["chatml"]).get_vocab()


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of two whole tensors, by hand (mergekit's formula)."""
    dot = float((v0 / v0.norm() * v1 / v1.norm()).sum())
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def test_slerp_union(tmp_path, models):
    out = run(tmp_path, models, ["base", "chatml"], method="slerp", tokenizer_source="union",
              parameters={"t": 0.5})
    loads(out, 66)
    base, chatml = Rows(models["base"]), Rows(models["chatml"])
    for tensor in (EMBED, HEAD):
        # the base's matrix on the union vocabulary: its 64 rows, then chatml's chat rows
        v0 = torch.cat([base.tensors[tensor], chatml.tensors[tensor][64:]]).float()
        v1 = chatml.tensors[tensor].float()
        close(Rows(out).tensors[tensor], slerp(v0, v1, 0.5))


def test_force_token(tmp_path, models):
    out = run(tmp_path, models, ["base", "chatml"], tokenizer={
        "source": "union",
        "tokens": {"_tok_10": {"source": str(models["chatml"]), "force": True},
                   "_tok_11": {"source": str(models["base"]), "force": True},
                   "_tok_12": {"source": str(models["chatml"])},  # not forced: no change
                   # no source: the automatic rule's row (the base's: both have it), forced
                   "_tok_13": {"force": True}}})
    loads(out, 66)
    got, base, chatml = Rows(out), Rows(models["base"]), Rows(models["chatml"])
    for tensor in (EMBED, HEAD):
        close(got.row(tensor, "_tok_10"), chatml.row(tensor, "_tok_10"))
        close(got.row(tensor, "_tok_11"), base.row(tensor, "_tok_11"))
        close(got.row(tensor, "_tok_12"),
              (base.row(tensor, "_tok_12") + chatml.row(tensor, "_tok_12")) / 2)
        close(got.row(tensor, "_tok_13"), base.row(tensor, "_tok_13"))
    # the recipe saved beside the model reads back as the same tokenizer options
    saved = parse_recipe(yaml.safe_load((out / "supermerge_recipe.yaml").read_text()))
    chatml_source = TokenSource("model", str(models["chatml"]))
    assert saved.to_spec().tokenizer == TokenizerSpec("union", {
        "_tok_10": TokenSpec(chatml_source, True),
        "_tok_11": TokenSpec(TokenSource("model", str(models["base"])), True),
        "_tok_12": TokenSpec(chatml_source, False), "_tok_13": TokenSpec(None, True)})


def test_model_token_and_token_id(tmp_path, models):
    out = run(tmp_path, models, ["base", "chatml"], tokenizer={
        "source": "base",
        "tokens": {
            "_tok_20": {"source": {"kind": "model_token", "model": str(models["chatml"]),
                                   "token_id": 64}, "force": True},
            "_tok_21": {"source": {"kind": "model_token", "model": str(models["base"]),
                                   "token": "<s>"}, "force": True},
            "<new>": {"source": {"kind": "zero"}}}})  # added to the vocabulary, zeros
    loads(out, 65)
    got, base, chatml = Rows(out), Rows(models["base"]), Rows(models["chatml"])
    for tensor in (EMBED, HEAD):
        close(got.row(tensor, "_tok_20"), chatml.tensors[tensor][64].float())
        close(got.row(tensor, "_tok_21"), base.row(tensor, "<s>"))
        close(got.row(tensor, "<new>"), torch.zeros(16))


def test_pad_to_multiple_of(tmp_path, models):
    out = run(tmp_path, models, ["chatml"], base="chatml",
              tokenizer={"source": "base", "pad_to_multiple_of": 16})
    loads(out, 66, rows=80)
    got, chatml = Rows(out), Rows(models["chatml"])
    for tensor in (EMBED, HEAD):
        close(got.tensors[tensor][:66], chatml.tensors[tensor])
        close(got.tensors[tensor][66:], chatml.tensors[tensor].mean(0).expand(14, -1))


# -- the fallback rules, other methods, tied embeddings ---------------------------------------


def test_rows_follow_tokens_and_a_token_missing_in_the_base_gets_the_mean(tmp_path, models):
    """chatml2 holds every token at another id; <|im_start|> is in chatml and chatml2 but
    not in the base, so the base's row for it is the mean of theirs (weights 1, 2, 3)."""
    recipe = {"merge_method": "linear", "base_model": str(models["base"]),
              "tokenizer_source": "union",
              "models": [{"model": str(models[n]), "parameters": {"weight": w}}
                         for n, w in (("base", 1.0), ("chatml", 2.0), ("chatml2", 3.0))]}
    supermerge.merge(recipe, tmp_path / "out")
    loads(tmp_path / "out", 66)
    got, base = Rows(tmp_path / "out"), Rows(models["base"])
    c1, c2 = Rows(models["chatml"]), Rows(models["chatml2"])
    for tensor in (EMBED, HEAD):
        for token in ("_tok_5", "_tok_60", "</s>"):  # at its own id in each model
            close(got.row(tensor, token), (base.row(tensor, token) + 2 * c1.row(tensor, token)
                                           + 3 * c2.row(tensor, token)) / 6)
        for token in CHATML:
            mean = (c1.row(tensor, token) + c2.row(tensor, token)) / 2
            close(got.row(tensor, token),
                  (mean + 2 * c1.row(tensor, token) + 3 * c2.row(tensor, token)) / 6)


def test_a_token_one_model_lacks_gets_the_base_row_if_the_base_has_it(tmp_path, models):
    """short lacks _tok_61, which the base and chatml have: short's row is the base's (not
    the mean of the two); chatml's chat tokens are chatml's alone: its rows everywhere."""
    out = run(tmp_path, models, ["base", "chatml", "short"], tokenizer_source="union")
    loads(out, 66)
    got, base, chatml = Rows(out), Rows(models["base"]), Rows(models["chatml"])
    for tensor in (EMBED, HEAD):
        b, c = base.row(tensor, "_tok_61"), chatml.row(tensor, "_tok_61")
        close(got.row(tensor, "_tok_61"), (b + c + b) / 3)
        s = Rows(models["short"]).row(tensor, "_tok_59")
        close(got.row(tensor, "_tok_59"), (base.row(tensor, "_tok_59") + chatml.row(
            tensor, "_tok_59") + s) / 3)


def test_merging_a_model_with_itself_on_the_union_gives_it_back(tmp_path, models):
    out = run(tmp_path, models, ["chatml", "chatml"], base="chatml", tokenizer_source="union")
    got, chatml = Rows(out), Rows(models["chatml"])
    assert got.vocab == chatml.vocab
    assert got.tensors.keys() == chatml.tensors.keys()
    for name, tensor in chatml.tensors.items():
        assert torch.equal(got.tensors[name], tensor), name


def test_task_arithmetic_union_remaps_the_base_too(tmp_path, models):
    """A method on task vectors: the base's matrix on the union vocabulary is the base
    each task vector is taken from (here its chat rows: the mean of the two models')."""
    out = run(tmp_path, models, ["chatml", "chatml2"], method="task_arithmetic",
              tokenizer_source="union")
    loads(out, 66)
    got, base = Rows(out), Rows(models["base"])
    c1, c2 = Rows(models["chatml"]), Rows(models["chatml2"])
    for tensor in (EMBED, HEAD):
        b = base.row(tensor, "_tok_9")
        close(got.row(tensor, "_tok_9"), b + (c1.row(tensor, "_tok_9") - b)
              + (c2.row(tensor, "_tok_9") - b))
        for token in CHATML:
            m = (c1.row(tensor, token) + c2.row(tensor, token)) / 2
            close(got.row(tensor, token),
                  m + (c1.row(tensor, token) - m) + (c2.row(tensor, token) - m))


def test_tied_embeddings_are_read_through_the_input_embedding(tmp_path, models):
    """``tied`` stores no lm_head: its output embedding is its input embedding."""
    assert HEAD not in Rows(models["tied"]).tensors
    out = run(tmp_path, models, ["base", "tied"], tokenizer_source="union")
    loads(out, 66)
    got, base, tied = Rows(out), Rows(models["base"]), Rows(models["tied"])
    close(got.row(HEAD, "_tok_5"), (base.row(HEAD, "_tok_5") + tied.row(EMBED, "_tok_5")) / 2)
    close(got.row(HEAD, "<|im_end|>"), tied.row(EMBED, "<|im_end|>"))
    close(got.row(EMBED, "<|im_end|>"), tied.row(EMBED, "<|im_end|>"))


# -- refusals, before any weight is read ------------------------------------------------------


def test_a_model_without_tokenizer_files_is_refused_naming_its_folder(tmp_path, models):
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in ("config.json", "model.safetensors"):
        (bare / file).write_bytes((models["chatml"] / file).read_bytes())
    with pytest.raises(PlanError) as err:
        supermerge.merge({"merge_method": "linear", "base_model": str(models["base"]),
                          "tokenizer_source": "union", "models": [str(models["base"]),
                                                                  str(bare)]},
                         tmp_path / "out")
    assert str(bare) in str(err.value) and "tokenizer files" in str(err.value)
    assert "copy the tokenizer files" in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, message", [
    ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "m"}}}}},
     "one of `token` or `token_id`"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "zero", "token": "y"}}}}},
     "takes no model"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
])
def test_bad_tokenizer_keys_are_recipe_errors(tmp_path, models, extra, message):
    with pytest.raises(RecipeError, match=message):
        supermerge.merge({"merge_method": "linear", "models": [str(models["base"])], **extra},
                         tmp_path / "out")


def test_token_rules_naming_other_models_or_missing_tokens_are_plan_errors(tmp_path, models):
    tokens = {"_tok_4": {"source": str(models["padded"])},  # not in this merge
              "_tok_5": {"source": {"kind": "model_token", "model": str(models["base"]),
                                    "token": "<|im_start|>"}},  # the base has no such token
              "_tok_6": {"source": {"kind": "model_token", "model": str(models["chatml"]),
                                    "token_id": 66}}}  # past its 66 rows
    with pytest.raises(PlanError) as err:
        run(tmp_path, models, ["base", "chatml"], tokenizer={"tokens": tokens})
    text = str(err.value)
    assert "not a model of this merge" in text and str(models["padded"]) in text
    assert "'<|im_start|>' has no row" in text and "66 has no row" in text
    assert not (tmp_path / "out").exists()


def test_an_adapter_output_cannot_change_the_vocabulary(tmp_path, models):
    with pytest.raises(PlanError, match="an adapter cannot change the base's vocabulary"):
        run(tmp_path, models, ["chatml"], method="task_arithmetic", tokenizer_source="union",
            output="adapter", rank=2)


def test_relative_tokenizer_paths_resolve_against_the_recipe_folder(tmp_path, models):
    """A recipe file's tokenizer paths, as its model paths, are relative to its folder."""
    root = models["base"].parent
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "linear", "base_model": "base", "models": ["base", "chatml"],
        "tokenizer": {"source": "chatml", "tokens": {"_tok_3": {"source": "chatml",
                                                                "force": True}}}}))
    (tmp_path / "base").symlink_to(root / "base")
    (tmp_path / "chatml").symlink_to(root / "chatml")
    supermerge.merge(recipe, tmp_path / "out")
    got, chatml = Rows(tmp_path / "out"), Rows(models["chatml"])
    close(got.row(EMBED, "_tok_3"), chatml.row(EMBED, "_tok_3"))
    assert len(got.vocab) == 66


def test_hub_ids_from_the_local_cache_name_models_and_token_sources(tmp_path, models,
                                                                    monkeypatch):
    """Models, the tokenizer source and a token's source given as hub ids (``org/name``)
    resolve through the local Hugging Face cache, offline (a fake cache here)."""
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    commit = "0123456789abcdef0123456789abcdef01234567"
    for name in ("base", "chatml"):
        repo = cache / f"models--tiny-org--{name}"
        shutil.copytree(models[name], repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    supermerge.merge({"merge_method": "linear", "base_model": "tiny-org/base",
                      "models": ["tiny-org/base", "tiny-org/chatml"],
                      "tokenizer": {"source": "tiny-org/chatml", "tokens": {
                          "_tok_3": {"source": "tiny-org/chatml", "force": True}}}},
                     tmp_path / "out")
    got, chatml = Rows(tmp_path / "out"), Rows(models["chatml"])
    assert len(got.vocab) == 66
    close(got.row(EMBED, "_tok_3"), chatml.row(EMBED, "_tok_3"))


def test_a_tokenizer_file_linking_out_of_its_folder_is_not_read(tmp_path, models, caplog):
    """As the writer's side files: a tokenizer.json that links outside the model folder
    is not followed, and the plan names it."""
    linked = tmp_path / "linked"
    linked.mkdir()
    for file in ("config.json", "model.safetensors", "tokenizer_config.json"):
        (linked / file).write_bytes((models["chatml"] / file).read_bytes())
    (linked / "tokenizer.json").symlink_to(models["chatml"] / "tokenizer.json")
    with pytest.raises(PlanError) as err:
        run(tmp_path, {**models, "linked": linked}, ["base", "linked"],
            tokenizer_source="union")
    assert f"file {linked / 'tokenizer.json'}" in str(err.value)
    assert "links out of the model folder" in str(err.value)
    assert "outside the model folder" in caplog.text
    assert not (tmp_path / "out").exists()


# -- other architectures: GPT-2 (tied `wte`, no lm_head), Llava (`text_config.vocab_size`) ---


def make_arch(folder: Path, arch: str, rows: int, added: list[str], seed: int) -> Path:
    torch.manual_seed(seed)
    if arch == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=rows, n_embd=16, n_layer=1, n_head=2, n_positions=32,
            bos_token_id=1, eos_token_id=2))
    else:
        text = transformers.LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1)
        vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               image_size=8, patch_size=4, projection_dim=16)
        model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
            vision_config=vision, text_config=text, image_token_index=3))
    model.save_pretrained(folder)
    make_tokenizer(SPECIAL + ORDINARY, added).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["gpt2", "llava"])
def test_other_architectures_union(tmp_path, arch):
    base = make_arch(tmp_path / "base", arch, 64, [], seed=0)
    chat = make_arch(tmp_path / "chat", arch, 66, CHATML, seed=1)
    out = tmp_path / "out"
    supermerge.merge({"merge_method": "linear", "base_model": str(base), "models": [
        str(base), str(chat)], "tokenizer_source": "union"}, out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok.get_vocab()) == 66
    config = transformers.AutoConfig.from_pretrained(out)
    assert (config.vocab_size if arch == "gpt2" else config.text_config.vocab_size) == 66
    got, b, c = Rows(out), Rows(base), Rows(chat)
    names = [n for n in c.tensors if n.endswith(("wte.weight", "embed_tokens.weight",
                                                  "lm_head.weight"))]
    assert len(names) == (1 if arch == "gpt2" else 2)
    for name in names:
        assert got.tensors[name].shape == (66, 16)
        close(got.row(name, "<|im_start|>"), c.row(name, "<|im_start|>"))
        close(got.row(name, "_tok_40"), (b.row(name, "_tok_40") + c.row(name, "_tok_40")) / 2)
    cls = (transformers.GPT2LMHeadModel if arch == "gpt2"
           else transformers.LlavaForConditionalGeneration)
    model = cls.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (66, 16)
    ids = tok("<s> _tok_5 <|im_end|>", return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, 3, 66)


def test_tokenizer_options_with_slices_are_refused_before_reading(tmp_path, models):
    with pytest.raises(PlanError, match="tokenizer options .* not possible with `slices`"):
        supermerge.merge({"merge_method": "passthrough", "tokenizer_source": "union",
                          "slices": [{"sources": [{"model": str(models["base"]),
                                                   "layer_range": [0, 1]}]}]},
                         tmp_path / "out")
    assert not (tmp_path / "out").exists()
