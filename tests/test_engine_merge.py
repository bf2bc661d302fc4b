"""End-to-end merges through the streaming engine, checked against oracles in memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import supermerge
from conftest import make_family, recipe, save_family
from supermerge.errors import InputValueError, PlanError, RecipeError
from supermerge.methods import get_method


def load_out(out):
    """Read every tensor of a merged output directory (single or sharded)."""
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_task_arithmetic_matches_the_formula(family, tmp_path):
    base, experts, base_path, paths = family
    out = tmp_path / "out"
    result = supermerge.merge(
        recipe("task_arithmetic", base_path, paths, parameters={"lambda": 0.5},
               models=[{"model": str(p), "parameters": {"weight": w}}
                       for p, w in zip(paths, [1.0, -1.0, 2.0], strict=True)]), out)
    merged = load_out(out)
    assert result.merged == len(base) and result.copied == 0
    for name, b in base.items():
        expected = b + 0.5 * (1.0 * (experts[0][name] - b) - (experts[1][name] - b)
                              + 2.0 * (experts[2][name] - b))
        torch.testing.assert_close(merged[name], expected)
    assert (out / "supermerge_recipe.yaml").read_text().startswith("merge_method: task_arithmetic")
    card = (out / "README.md").read_text()
    assert "base_model_relation: merge" in card


def test_every_method_in_the_engine_equals_the_method_on_tensors(family, tmp_path):
    """The engine adds no arithmetic of its own: each tensor is the method applied to it."""
    base, experts, base_path, paths = family
    for method in ["linear", "ties", "dare_ties", "dare_linear", "task_arithmetic"]:
        out = tmp_path / method
        supermerge.merge(recipe(method, base_path, paths, seed=7), out)
        merged = load_out(out)
        from supermerge.engine.plan import tensor_seed

        for name, b in base.items():
            expected = get_method(method)(b, [e[name] for e in experts],
                                          seed=tensor_seed(7, name), name=name)
            torch.testing.assert_close(merged[name], expected, msg=f"{method} {name}")


@pytest.mark.parametrize("method", ["dare_ties", "ties", "della"])
def test_output_is_identical_whatever_the_thread_count(family, tmp_path, monkeypatch, method):
    from supermerge.engine import executor

    _, _, base_path, paths = family
    monkeypatch.setattr(executor, "PARALLEL_FROM", 1)  # threads for the tiny tensors too
    outputs = []
    before = torch.get_num_threads()
    for threads, compute_threads, cores in ((1, 1, 1), (4, 2, 2), (2, 1, 4)):
        monkeypatch.setattr(executor.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        out = tmp_path / f"t{threads}-{compute_threads}-{cores}"
        supermerge.merge(recipe(method, base_path, paths, seed=3), out, threads=threads,
                         compute_threads=compute_threads)
        outputs.append(load_out(out))
        assert torch.get_num_threads() == before  # the merge's setting is restored
    for other in outputs[1:]:
        for name in outputs[0]:
            assert torch.equal(outputs[0][name], other[name])


def test_compute_threads_leave_the_readers_their_cores(monkeypatch):
    from supermerge.engine import executor

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    for cores, readers, expected in ((8, 2, 6), (2, 2, 1), (1, 2, 1), (32, 2, 8)):
        monkeypatch.setattr(executor.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert executor.default_compute_threads(readers) == expected


def test_inputs_are_recycled_within_the_budget(family, tmp_path, monkeypatch):
    from supermerge.engine import executor
    from supermerge.engine.plan import MergePlan

    _, _, base_path, paths = family
    # one job in flight at a time: the tiny model would otherwise be read ahead whole
    monkeypatch.setattr(MergePlan, "memory_budget",
                        lambda self: (len(self.experts) + 1) * self.largest_tensor_bytes)
    reused: list[torch.Tensor] = []
    admit = executor._Memory.admit

    def checked_admit(self, job, *, first):
        buffers = admit(self, job, first=first)
        assert self.in_flight + self._kept_bytes <= max(self.budget, job.input_bytes())
        reused.extend(b for b in buffers or [] if b is not None)
        return buffers

    monkeypatch.setattr(executor._Memory, "admit", checked_admit)
    supermerge.merge(recipe("ties", base_path, paths, seed=3), tmp_path / "recycled")
    assert reused  # the layers repeat their shapes
    monkeypatch.setattr(executor._Memory, "recycle", lambda self, tensors: None)
    supermerge.merge(recipe("ties", base_path, paths, seed=3), tmp_path / "fresh")
    recycled, fresh = load_out(tmp_path / "recycled"), load_out(tmp_path / "fresh")
    assert recycled.keys() == fresh.keys()
    for name in fresh:
        assert torch.equal(recycled[name], fresh[name])


def test_method_threads_use_the_cores_torch_leaves(monkeypatch):
    from supermerge.engine import executor

    for cores, torch_threads, expected in ((2, 1, 2), (2, 2, 1), (16, 6, 2), (1, 1, 1), (4, 8, 1)):
        monkeypatch.setattr(executor.os, "sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert executor.method_threads(torch_threads) == expected


def test_gradient_and_filter_values_reach_each_tensor(family, tmp_path):
    base, experts, base_path, paths = family
    parameters = {"lambda": [{"filter": "mlp.bias", "value": 0.0}, {"value": [1.0, 3.0]}]}
    out = tmp_path / "out"
    supermerge.merge(recipe("task_arithmetic", base_path, paths[:1], parameters=parameters), out)
    merged = load_out(out)
    tau = {n: experts[0][n] - base[n] for n in base}
    torch.testing.assert_close(merged["model.layers.0.mlp.bias"], base["model.layers.0.mlp.bias"])
    for layer, scale in ((0, 1.0), (1, 3.0)):
        name = f"model.layers.{layer}.mlp.weight"
        torch.testing.assert_close(merged[name], base[name] + scale * tau[name])
    # embeddings sit at depth 0, the final norm at depth 1
    torch.testing.assert_close(merged["model.embed_tokens.weight"],
                               base["model.embed_tokens.weight"] + tau["model.embed_tokens.weight"])
    torch.testing.assert_close(merged["model.norm.weight"],
                               base["model.norm.weight"] + 3.0 * tau["model.norm.weight"])


def test_integer_buffers_are_copied_from_the_base_and_dtype_follows_the_recipe(tmp_path):
    base, experts = make_family(k=2)
    base["position_ids"] = torch.arange(8)
    for i, e in enumerate(experts):
        e["position_ids"] = torch.arange(8) + 100 * (i + 1)
    base_path, paths = save_family(tmp_path / "in", base, experts)
    out = tmp_path / "out"
    supermerge.merge(recipe("linear", base_path, paths, dtype="bfloat16"), out)
    merged = load_out(out)
    assert torch.equal(merged["position_ids"], torch.arange(8))
    assert merged["model.norm.weight"].dtype == torch.bfloat16
    expected = (experts[0]["model.norm.weight"] + experts[1]["model.norm.weight"]) / 2
    torch.testing.assert_close(merged["model.norm.weight"], expected.bfloat16())


def test_bf16_inputs_keep_bf16_and_compute_in_float32(tmp_path):
    base, experts = make_family(k=2)
    to16 = lambda d: {n: t.bfloat16() for n, t in d.items()}  # noqa: E731
    base_path, paths = save_family(tmp_path / "in", to16(base), [to16(e) for e in experts])
    out = tmp_path / "out"
    supermerge.merge(recipe("task_arithmetic", base_path, paths), out)
    merged = load_out(out)
    name = "model.layers.0.mlp.weight"
    b = base[name].bfloat16().float()
    expected = b + sum(e[name].bfloat16().float() - b for e in experts)
    assert merged[name].dtype == torch.bfloat16
    torch.testing.assert_close(merged[name], expected.bfloat16())


def test_all_plan_problems_are_reported_together_before_reading(tmp_path):
    base, experts = make_family(k=3)
    del experts[0]["model.layers.1.mlp.bias"]
    experts[1]["model.layers.0.mlp.weight"] = torch.zeros(8, 4)
    base_path, paths = save_family(tmp_path / "in", base, experts)
    with pytest.raises(PlanError) as info:
        supermerge.merge(recipe("ties", base_path, [*paths, tmp_path / "nowhere"],
                                parameters={"densty": 0.5}), tmp_path / "out")
    text = str(info.value)
    assert "nowhere" in text  # missing path
    problems = info.value.problems
    assert len(problems) == 1  # a missing input stops planning after the inputs are opened
    with pytest.raises(PlanError) as info:
        supermerge.merge(recipe("ties", base_path, paths, parameters={"density": 0.5}),
                         tmp_path / "out")
    messages = [p.render() for p in info.value.problems]
    assert any("missing" in m and "model.layers.1.mlp.bias" in m and "expert0" in m
               for m in messages)
    assert any("shape (8, 4)" in m and "expert1" in m for m in messages)
    assert not (tmp_path / "out").exists()


def test_unknown_parameter_lists_the_valid_ones(family, tmp_path):
    _, _, base_path, paths = family
    with pytest.raises(PlanError, match="(?s)densty.*density"):
        supermerge.merge(recipe("ties", base_path, paths, parameters={"densty": 0.5}),
                         tmp_path / "out")


def test_invalid_value_names_the_tensor(family, tmp_path):
    _, _, base_path, paths = family
    bad = [{"filter": "norm", "value": 1.5}, {"value": 0.5}]
    with pytest.raises(PlanError, match="model.norm.weight"):
        supermerge.merge(recipe("ties", base_path, paths, parameters={"density": bad}),
                         tmp_path / "out")


def test_unknown_method_and_recipe_keys_are_clear_errors(family, tmp_path):
    _, _, base_path, paths = family
    with pytest.raises(supermerge.SupermergeError, match="(?s)unknown merge method.*ties"):
        supermerge.merge(recipe("tiez", base_path, paths), tmp_path / "out")
    with pytest.raises(RecipeError, match="slices"):
        supermerge.merge({"merge_method": "linear", "slices": []}, tmp_path / "out")
    with pytest.raises(RecipeError, match="valid top-level keys"):
        supermerge.merge({**recipe("linear", base_path, paths), "dtyp": "bf16"}, tmp_path / "out")


@pytest.mark.parametrize("policy", ["refuse", "warn"])
def test_nan_inputs_are_refused_or_warned(tmp_path, policy, caplog):
    base, experts = make_family(k=2)
    experts[1]["model.layers.1.mlp.weight"][0, 0] = float("nan")
    base_path, paths = save_family(tmp_path / "in", base, experts)
    out = tmp_path / "out"
    job = recipe("linear", base_path, paths, on_nonfinite=policy)
    if policy == "refuse":
        with pytest.raises(InputValueError, match="(?s)expert1.*model.layers.1.mlp.weight"):
            supermerge.merge(job, out)
        assert not out.exists()
        assert not list(tmp_path.glob(".out*")), "temporary output left behind"
    else:
        supermerge.merge(job, out)
        assert "NaN/Inf" in caplog.text
    assert torch.isnan(load_file(str(paths[1]))["model.layers.1.mlp.weight"][0, 0])


def test_existing_output_needs_overwrite_and_is_replaced_whole(family, tmp_path):
    _, _, base_path, paths = family
    out = tmp_path / "out"
    supermerge.merge(recipe("task_arithmetic", base_path, paths), out)
    (out / "notes.txt").write_text("precious")
    with pytest.raises(PlanError, match="already exists"):
        supermerge.merge(recipe("linear", base_path, paths), out)
    assert (out / "notes.txt").read_text() == "precious"
    with pytest.raises(PlanError, match="would be lost: notes.txt"):  # not supermerge's file
        supermerge.merge(recipe("linear", base_path, paths), out, overwrite=True)
    (out / "notes.txt").unlink()
    supermerge.merge(recipe("linear", base_path, paths), out, overwrite=True)
    assert (out / "model.safetensors").exists()
    assert "linear" in (out / "supermerge_recipe.yaml").read_text()
    not_a_model = tmp_path / "docs"
    not_a_model.mkdir()
    (not_a_model / "thesis.tex").write_text("years of work")
    with pytest.raises(supermerge.SupermergeError, match="did not write"):
        supermerge.merge(recipe("linear", base_path, paths), not_a_model, overwrite=True)
    assert (not_a_model / "thesis.tex").exists()


def test_output_that_is_an_input_is_refused(family, tmp_path):
    _, _, base_path, paths = family
    out = tmp_path / "out"
    supermerge.merge(recipe("linear", base_path, paths), out)
    with pytest.raises(PlanError, match="is also an input"):
        supermerge.merge(recipe("linear", base_path, [out, paths[0]]), out, overwrite=True)
    assert (out / "model.safetensors").exists()


def test_inputs_are_never_modified(family, tmp_path):
    _, _, base_path, paths = family
    before = [p.read_bytes() for p in [base_path, *paths]]
    supermerge.merge(recipe("ties", base_path, paths), tmp_path / "out")
    assert [p.read_bytes() for p in [base_path, *paths]] == before


def test_vocabulary_mismatch_merges_common_rows_or_refuses(tmp_path):
    base, experts = make_family(k=2)
    name = "model.embed_tokens.weight"
    experts[1][name] = torch.cat([experts[1][name], torch.ones(4, 8)])  # 20 rows vs 16
    experts[0][name] = experts[0][name][:12]  # 12 rows
    base_path, paths = save_family(tmp_path / "in", base, experts)
    out = tmp_path / "out"
    result = supermerge.merge(recipe("task_arithmetic", base_path, paths), out)
    merged = load_out(out)[name]
    assert merged.shape == (16, 8)
    expected = base[name][:12] + sum(e[name][:12] - base[name][:12] for e in experts)
    torch.testing.assert_close(merged[:12], expected)
    torch.testing.assert_close(merged[12:], base[name][12:])
    assert any("vocabulary" in w for w in result.warnings)
    with pytest.raises(PlanError, match="common_rows"):
        supermerge.merge(recipe("task_arithmetic", base_path, paths, vocab="refuse"),
                         tmp_path / "out2")


def test_missing_tensor_can_fall_back_to_the_base(tmp_path):
    base, experts = make_family(k=2)
    del experts[0]["model.norm.weight"]
    base_path, paths = save_family(tmp_path / "in", base, experts)
    out = tmp_path / "out"
    supermerge.merge(recipe("task_arithmetic", base_path, paths, on_missing="base"), out)
    name = "model.norm.weight"
    torch.testing.assert_close(load_out(out)[name], experts[1][name])


def test_ties_model_scope_trims_against_the_whole_task_vector(family, tmp_path):
    base, experts, base_path, paths = family
    out = tmp_path / "out"
    supermerge.merge(recipe("ties", base_path, paths,
                            parameters={"density": 0.3, "trim_scope": "model"}), out)
    merged = load_out(out)
    names = list(base)
    for i, e in enumerate(experts):  # the oracle: one global top-30% per expert
        flat = torch.cat([(e[n] - base[n]).abs().flatten() for n in names])
        k = round(0.3 * flat.numel())
        threshold = flat.kthvalue(flat.numel() - k + 1).values
        experts[i] = {n: base[n] + torch.where((e[n] - base[n]).abs() >= threshold,
                                               e[n] - base[n], torch.zeros(()))
                      for n in names}
    for n in names:  # after trimming, TIES at density 1 is exactly election + disjoint mean
        expected = get_method("ties")(base[n], [e[n] for e in experts], density=1.0)
        torch.testing.assert_close(merged[n], expected)
    with pytest.raises(PlanError, match="cannot vary per tensor"):
        supermerge.merge(recipe("ties", base_path, paths,
                                parameters={"density": [0.2, 0.4], "trim_scope": "model"}),
                         tmp_path / "out2")


def test_sharded_output_has_an_index(family, tmp_path):
    base, _, base_path, paths = family
    out = tmp_path / "out"
    supermerge.merge(recipe("linear", base_path, paths), out, shard_size=600)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base)
    assert len(set(index["weight_map"].values())) > 1
    assert set(load_out(out)) == set(base)


def test_merge_of_k_copies_returns_the_model(tmp_path):
    base, _ = make_family(k=1)
    gen = torch.Generator().manual_seed(5)
    model = {n: t + torch.randn(t.shape, generator=gen) for n, t in base.items()}
    base_path, paths = save_family(tmp_path / "in", base, [model, model, model])
    for method in ["linear", "ties", "task_arithmetic"]:
        out = tmp_path / method
        params = {"density": 1.0} if method == "ties" else {}
        params |= {"lambda": 1 / 3} if method == "task_arithmetic" else {}
        supermerge.merge(recipe(method, base_path, paths, parameters=params), out)
        for name, t in load_out(out).items():
            torch.testing.assert_close(t, model[name], msg=method)


def test_recipe_file_paths_resolve_next_to_the_recipe(family, tmp_path):
    _, _, base_path, paths = family
    text = ("merge_method: task_arithmetic\nbase_model: in/base.safetensors\nmodels:\n"
            "  - model: in/expert0.safetensors\n    parameters: {weight: 0.5}\n"
            "  - in/expert1.safetensors\n")
    (tmp_path / "r.yaml").write_text(text)
    out = tmp_path / "out"
    supermerge.merge(tmp_path / "r.yaml", out)
    assert load_out(out)


def test_base_listed_among_models_is_dropped_for_task_vector_methods(family, tmp_path):
    base, experts, base_path, paths = family
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    supermerge.merge(recipe("task_arithmetic", base_path, [base_path, *paths]), out_a)
    supermerge.merge(recipe("task_arithmetic", base_path, paths), out_b)
    a, b = load_out(out_a), load_out(out_b)
    for n in a:
        assert torch.equal(a[n], b[n])


def test_mixed_float_dtypes_merge_in_float32_and_int_float_clash_is_refused(tmp_path):
    base, experts = make_family(k=2)
    experts[0] = {n: t.half() for n, t in experts[0].items()}
    experts[1] = {n: t.bfloat16() for n, t in experts[1].items()}
    base_path, paths = save_family(tmp_path / "in", base, experts)
    out = tmp_path / "out"
    supermerge.merge(recipe("linear", base_path, paths), out)
    name = "model.layers.0.mlp.weight"
    merged = load_out(out)[name]
    assert merged.dtype == torch.float32  # the base's dtype
    torch.testing.assert_close(merged, (experts[0][name].float() + experts[1][name].float()) / 2)
    experts[1]["model.norm.weight"] = torch.ones(8, dtype=torch.int32)
    base_path, paths = save_family(tmp_path / "in2", base, experts)
    with pytest.raises(PlanError, match="not a float dtype"):
        supermerge.merge(recipe("linear", base_path, paths), tmp_path / "out2")


def test_a_spec_built_in_python_is_saved_beside_the_model(family, tmp_path):
    from supermerge.engine import MergeSpec, ModelSpec

    _, _, base_path, paths = family
    spec = MergeSpec(method="ties", base_model=str(base_path),
                     models=[ModelSpec(str(p), {"density": 0.5}) for p in paths])
    out = tmp_path / "out"
    supermerge.merge(spec, out)
    saved = (out / "supermerge_recipe.yaml").read_text()
    assert "ties" in saved and "density: 0.5" in saved
