"""``opcm``: continual merging by orthogonal projection and adaptive scaling (OPCM)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from tests.conftest import make_family, recipe, save_family

import supermerge
from supermerge.cli.main import cli
from supermerge.errors import MethodError, PlanError, RecipeError
from supermerge.methods import opcm
from supermerge.methods.opcm_method import orthogonal_part

T = torch.tensor


def reference_opcm(base: dict, experts: list[dict], alpha: float) -> dict:
    """OPCM written out with full SVDs and Python loops (independent of the method's helpers):
    project each matrix in U^T tau V coordinates, then scale by whole-model norms."""
    running = {n: (experts[0][n] - base[n]).double() for n in base}
    norms = [math.sqrt(sum(float((e[n] - base[n]).double().square().sum()) for n in base))
             for e in experts]
    for expert in experts[1:]:
        for n in base:
            tau = (expert[n] - base[n]).double()
            if tau.dim() == 2:
                u, s, vh = torch.linalg.svd(running[n], full_matrices=True)
                coords = u.T @ tau @ vh.T
                total, r, acc = float(s.sum()), 0, 0.0
                for value in s.tolist():
                    acc += value
                    if acc / total > alpha:
                        break
                    r += 1
                for i in range(min(coords.shape)):
                    coords[i, i] = 0.0
                coords[:r, :r] = 0.0
                tau = u @ coords @ vh
            running[n] = running[n] + tau
    size = math.sqrt(sum(float(t.square().sum()) for t in running.values()))
    factor = (sum(norms) / len(norms)) / size
    return {n: (base[n].double() + factor * running[n]).float() for n in base}


def merge_files(tmp_path, base_path, paths, name, **parameters):
    out = tmp_path / name
    supermerge.merge(recipe("opcm", base_path, paths, parameters=parameters), out)
    return out, load_file(str(out / "model.safetensors"))


def test_hand_computed_projection_and_scaling():
    # S_1 = diag(3, 2, 1): cumulative shares 1/2, 5/6, 1. With alpha 0.9 the top 2 x 2
    # block goes (r = 2), with alpha 0.5 only (0, 0) (r = 1); the diagonal always goes.
    # tau_2 = ones: P(tau_2) keeps [[0,0,1],[0,0,1],[1,1,0]] resp. ones minus the diagonal.
    base = torch.zeros(3, 3)
    first, second = torch.diag(T([3.0, 2.0, 1.0])), torch.ones(3, 3)
    mean = (math.sqrt(14) + 3) / 2  # the task vectors' norms: sqrt(9 + 4 + 1) and 3
    kept = T([[3.0, 0, 1], [0, 2, 1], [1, 1, 1]])  # ||.||^2 = 18
    out = opcm(base, [first, second], alpha=0.9)
    torch.testing.assert_close(out, kept * mean / math.sqrt(18))
    kept = T([[3.0, 1, 1], [1, 2, 1], [1, 1, 1]])  # ||.||^2 = 20
    out = opcm(base, [first, second], alpha=0.5)
    torch.testing.assert_close(out, kept * mean / math.sqrt(20))


def test_engine_matches_the_full_svd_oracle_with_whole_model_norms(tmp_path):
    shapes = {"a.weight": (4, 3), "b.weight": (2, 5), "b.bias": (5,)}
    base, experts = make_family(k=3, seed=3, shapes=shapes, scale=1.0)
    base_path, paths = save_family(tmp_path / "in", base, experts)
    for alpha in (0.0, 0.5, 0.8):
        _, merged = merge_files(tmp_path, base_path, paths, f"out{alpha}", alpha=alpha)
        expected = reference_opcm(base, experts, alpha)
        for n in base:
            torch.testing.assert_close(merged[n], expected[n], rtol=1e-5, atol=1e-5)


def test_projected_update_is_orthogonal_to_the_running_one():
    gen = torch.Generator().manual_seed(0)
    base = torch.zeros(5, 4)
    taus = [torch.randn(5, 4, generator=gen) for _ in range(2)]
    out = opcm(base, taus, alpha=0.5)
    # out = c (tau_1 + P(tau_2)) with <P(tau_2), tau_1> = 0
    c = float((out * taus[0]).sum() / taus[0].square().sum())
    projected = out / c - taus[0]
    assert abs(float((projected * taus[0]).sum())) < 1e-4 * float(taus[0].norm() * taus[1].norm())
    assert projected.norm() > 0.1 * taus[1].norm()  # but not all of tau_2 is removed


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 6), rank=st.integers(0, 6),
       alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_projection_is_an_orthogonal_contraction(m, n, rank, alpha, seed):
    # P removes orthonormal components u_i v_j^T of tau: <P(tau), S> = 0, ||P(tau)|| <=
    # ||tau||, P(S) = 0; a running update of any rank (0: nothing is removed)
    gen = torch.Generator().manual_seed(seed)
    k = min(rank, m, n)
    running = (torch.randn(m, k, generator=gen) @ torch.randn(k, n, generator=gen)).double()
    tau = torch.randn(m, n, generator=gen).double()
    kept = orthogonal_part(running, tau, alpha)
    assert abs(float((kept * running).sum())) <= 1e-9 * (1 + float(running.norm() * tau.norm()))
    assert float(kept.norm()) <= float(tau.norm()) * (1 + 1e-12)
    assert float(orthogonal_part(running, running.clone(), alpha).norm()) <= 1e-9 * (
        1 + float(running.norm()))
    if k == 0:
        assert torch.equal(kept, tau)


def test_one_expert_is_base_plus_its_task_vector(family, tmp_path):
    base, experts, base_path, paths = family
    _, merged = merge_files(tmp_path, base_path, paths[:1], "one")
    for n in base:
        torch.testing.assert_close(merged[n], experts[0][n], rtol=0, atol=1e-6)


def test_identical_experts_give_it_back_on_matrices_and_rescale_the_rest(tmp_path):
    # P(tau) = 0 against tau itself, so matrices keep tau; a bias adds up K times; then
    # the whole model is scaled to the (common) task-vector norm.
    shapes = {"w": (4, 3), "b": (3,)}
    base, experts = make_family(k=1, seed=5, shapes=shapes)
    base_path, paths = save_family(tmp_path / "in", base, experts)
    matrices = {"w": (4, 3)}
    mbase, mexperts = make_family(k=1, seed=5, shapes=matrices)
    mbase_path, mpaths = save_family(tmp_path / "m", mbase, mexperts)
    _, merged = merge_files(tmp_path, mbase_path, mpaths * 3, "matrices")
    torch.testing.assert_close(merged["w"], mexperts[0]["w"], rtol=0, atol=1e-6)
    _, merged = merge_files(tmp_path, base_path, paths * 3, "mixed")
    tau = {n: experts[0][n] - base[n] for n in base}
    norm = math.sqrt(sum(float(t.square().sum()) for t in tau.values()))
    summed = {"w": tau["w"], "b": 3 * tau["b"]}
    factor = norm / math.sqrt(sum(float(t.square().sum()) for t in summed.values()))
    for n in base:
        torch.testing.assert_close(merged[n], base[n] + factor * summed[n], rtol=0, atol=1e-6)


def test_weights_scale_the_task_vectors():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(4, 4, generator=gen)
    taus = [torch.randn(4, 4, generator=gen) for _ in range(2)]
    out = opcm(base, [base + t for t in taus], weights=[2.0, 0.5])
    expected = opcm(base, [base + 2 * taus[0], base + 0.5 * taus[1]])
    torch.testing.assert_close(out, expected)


def test_zero_task_vectors_give_the_base():
    base = torch.randn(3, 3)
    torch.testing.assert_close(opcm(base, [base.clone(), base.clone()]), base)


def test_only_the_first_model_may_carry_a_merged_state():
    base = torch.zeros(2, 2)
    with pytest.raises(MethodError, match="only the first model"):
        opcm(base, [torch.ones(2, 2), torch.ones(2, 2)],
             per_model=[{}, {"tasks": 2, "norm_sum": 1.0, "running_scale": 1.5}])


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_continuing_a_merge_equals_merging_all_at_once_without_the_earlier_experts(tmp_path):
    base, experts = make_family(k=4, seed=7, scale=0.5)
    base_path, paths = save_family(tmp_path / "in", base, experts)
    _, at_once = merge_files(tmp_path, base_path, paths, "all")
    first, _ = merge_files(tmp_path, base_path, paths[:3], "first3")
    state = json.loads((first / "merge_state.json").read_text())
    assert state["state"]["tasks"] == 3 and state["method"] == "opcm"
    assert state["experts"] == [str(p.resolve()) for p in paths[:3]]
    before = _digest(first)
    for p in paths[:3]:  # experts 1..K are never read again
        p.unlink()
    out = tmp_path / "continued"
    supermerge.merge({"merge_method": "opcm", "continual": str(first),
                      "models": [str(paths[3])]}, out)
    continued = load_file(str(out / "model.safetensors"))
    for n in base:
        torch.testing.assert_close(continued[n], at_once[n], rtol=1e-5, atol=1e-6)
    assert _digest(first) == before  # the input merge is untouched
    record = json.loads((out / "merge_state.json").read_text())
    assert record["state"]["tasks"] == 4
    assert record["experts"] == [str(p.resolve()) for p in paths]
    assert record["base_digest"] == state["base_digest"]


def test_order_changes_the_result_by_a_measured_amount(tmp_path, capsys):
    base, experts = make_family(k=3, seed=11, scale=0.5)
    base_path, paths = save_family(tmp_path / "in", base, experts)
    _, forward = merge_files(tmp_path, base_path, paths, "forward")
    _, backward = merge_files(tmp_path, base_path, paths[::-1], "backward")
    moved = math.sqrt(sum(float((forward[n] - backward[n]).square().sum()) for n in base))
    size = math.sqrt(sum(float((forward[n] - base[n]).square().sum()) for n in base))
    with capsys.disabled():
        print(f"\nopcm order sensitivity: ||forward - reversed|| / ||merged update|| = "
              f"{moved / size:.3f}")
    assert 0.01 < moved / size < 1.0


def test_cli_continues_a_merge_and_refuses_bad_continuations(tmp_path):
    base, experts = make_family(k=3, seed=13, scale=0.5)
    base_path, paths = save_family(tmp_path / "in", base, experts)
    other_base, _ = make_family(k=0, seed=99)
    other_path, _ = save_family(tmp_path / "other", other_base, [])
    runner = CliRunner()
    (tmp_path / "r.yaml").write_text(json.dumps(recipe("opcm", base_path, paths[:2])))
    first = tmp_path / "first"
    done = runner.invoke(cli, ["merge", str(tmp_path / "r.yaml"), "-o", str(first)])
    assert done.exit_code == 0, done.output
    before = _digest(first)
    out = tmp_path / "next"
    done = runner.invoke(cli, ["merge", "--into", str(first), str(paths[2]), "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert json.loads((out / "merge_state.json").read_text())["state"]["tasks"] == 3

    same = runner.invoke(cli, ["merge", "--into", str(first), str(paths[2]), "-o", str(first)])
    assert same.exit_code == 1 and "never modifies its input" in same.output
    ta = tmp_path / "ta"
    supermerge.merge(recipe("task_arithmetic", base_path, paths[:2]), ta)
    missing = runner.invoke(cli, ["merge", "--into", str(ta), str(paths[2]), "-o",
                                  str(tmp_path / "x")])
    assert missing.exit_code == 1 and "merge_state.json" in missing.output
    (tmp_path / "c.yaml").write_text(json.dumps({
        "merge_method": "opcm", "continual": str(first), "base_model": str(other_path),
        "models": [str(paths[2])]}))
    wrong = runner.invoke(cli, ["merge", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "y")])
    assert wrong.exit_code == 1 and "not the one" in wrong.output
    usage = runner.invoke(cli, ["merge", str(paths[0]), str(paths[1]), "-o", str(tmp_path / "z")])
    assert usage.exit_code == 2 and "--into" in usage.output
    assert _digest(first) == before
    for name in ("x", "y", "z"):
        assert not (tmp_path / name).exists()


def test_continual_with_another_method_is_refused(tmp_path):
    base, experts = make_family(k=2, seed=1)
    base_path, paths = save_family(tmp_path / "in", base, experts)
    first, _ = merge_files(tmp_path, base_path, paths[:1], "first")
    with pytest.raises(RecipeError, match="cannot do"):
        supermerge.merge({"merge_method": "ties", "continual": str(first),
                          "models": [str(paths[1])]}, tmp_path / "o")
    with pytest.raises(RecipeError, match="without new experts"):
        supermerge.merge({"merge_method": "opcm", "continual": str(first)}, tmp_path / "o")
    adapter = tmp_path / "adapter"  # a truncated update: no state to continue from
    supermerge.merge(recipe("opcm", base_path, paths, output="adapter", rank=2), adapter)
    assert not (adapter / "merge_state.json").exists()
    shutil.copytree(first, tmp_path / "moved")  # a copy continues as well: same record
    state = tmp_path / "moved" / "merge_state.json"
    state.write_text(state.read_text().replace('"opcm"', '"ties"', 1))
    with pytest.raises(PlanError, match="cannot continue"):
        supermerge.merge({"merge_method": "opcm", "continual": str(tmp_path / "moved"),
                          "models": [str(paths[1])]}, tmp_path / "o")
