"""Export of a data-driven merge: the model through the checkpoint writer, heads beside.

:func:`export_model` writes any merged state dict with ``heads/<task>.safetensors``, each
task's own head (load it over the model to answer that task; the model's own head
tensors are the base's); Fisher and RegMean merges use it alone. :func:`export_learned`
adds the learned coefficients, per learned node (``root`` alone for a flat merge):

- ``coefficients.safetensors``: ``<node>.raw`` (W) and ``<node>.coefficients`` (map(W)),
  K experts x J groups, with the expert and group names in the metadata;
- ``coefficients.json``: per node the map, expert names, group names, map(W) and the
  losses at the kept step; ``coefficients.csv``: one row per (node, expert, group);
- ``coefficients.png``: a heatmap of map(W) (experts x groups), one panel per node.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from supermerge.engine.heads import HeadMeta, head_files, heads_card_note
from supermerge.io import CheckpointWriter
from supermerge.learn.errors import LearnError
from supermerge.learn.hierarchical import LearnedMerge
from supermerge.learn.method import LearnedOutcome
from supermerge.learn.train import LearnResult

Fits = Mapping[str, LearnResult]


def coefficients_json(fits: Fits, selection: Mapping[str, float] | None = None,
                      chosen: str | None = None) -> str:
    """Return the readable JSON of every node's coefficients and losses, and of the
    configurations compared (``selection``: label -> held-out prediction loss) with the
    one kept."""
    nodes = {
        name: {
            "map": fit.coefficient_map,
            "experts": fit.expert_names,
            "groups": fit.group_names,
            "coefficients": fit.coefficients.tolist(),
            "best_step": fit.best_step,
            "steps_run": fit.steps_run,
            "train_loss": fit.train_loss,
            "heldout_loss": fit.heldout_loss,
            "heldout_accuracy": fit.heldout_accuracy,
            "objective": fit.objective,
        }
        for name, fit in fits.items()
    }
    chosen_part = {"selection": dict(selection), "configuration": chosen} if selection else {}
    return json.dumps({"nodes": nodes, **chosen_part}, indent=2) + "\n"


def coefficients_csv(fits: Fits) -> str:
    """Return CSV text: node, expert, group, raw W and mapped coefficient, one row each."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["node", "expert", "group", "raw", "coefficient"])
    for node, fit in fits.items():
        for i, expert in enumerate(fit.expert_names):
            for j, group in enumerate(fit.group_names):
                writer.writerow([node, expert, group, float(fit.raw[i, j]),
                                 float(fit.coefficients[i, j])])
    return out.getvalue()


def coefficient_tensors(fits: Fits) -> bytes:
    """Return ``coefficients.safetensors`` (raw and mapped W per node) as bytes."""
    tensors, metadata = {}, {}
    for node, fit in fits.items():
        tensors[f"{node}.raw"] = fit.raw.detach().float().contiguous()
        tensors[f"{node}.coefficients"] = fit.coefficients.detach().float().contiguous()
        metadata[node] = json.dumps(
            {"map": fit.coefficient_map, "experts": fit.expert_names, "groups": fit.group_names}
        )
    return save(tensors, metadata=metadata)


def plot_coefficients(fits: Fits, max_labels: int = 60) -> bytes:
    """Draw map(W) of every node as a heatmap (experts x groups); returns the PNG's bytes.

    Needs matplotlib. Groups beyond ``max_labels`` get every n-th label only.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise LearnError("the coefficient heatmap needs matplotlib",
                         fix="pip install 'supermerge[plot]'") from None

    widest = max(len(fit.group_names) for fit in fits.values())
    label_inches = 0.06 * max(len(name) for fit in fits.values() for name in fit.group_names)
    figure = Figure(figsize=(min(40.0, max(6.0, 0.18 * widest)),
                             sum(1.5 + label_inches + 0.35 * len(f.expert_names)
                                 for f in fits.values())),
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(fits), 1, squeeze=False)[:, 0]
    for ax, (node, fit) in zip(axes, fits.items(), strict=True):
        values = fit.coefficients.detach().float().numpy()
        low = 0.0 if fit.coefficient_map == "clamp" else -1.0
        image = ax.imshow(values, aspect="auto", vmin=low, vmax=1.0,
                          cmap="viridis" if low == 0 else "RdBu_r", interpolation="nearest")
        step = max(1, math.ceil(len(fit.group_names) / max_labels))
        ax.set_xticks(range(0, len(fit.group_names), step),
                      fit.group_names[::step], rotation=90, fontsize=6)
        ax.set_yticks(range(len(fit.expert_names)), fit.expert_names, fontsize=8)
        ax.set_title(f"{node}: {fit.coefficient_map}(W)", fontsize=9)
        figure.colorbar(image, ax=ax)
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=100, bbox_inches="tight")  # room for long names
    return png.getvalue()


def export_model(
    out: str | Path,
    state: Mapping[str, torch.Tensor],
    heads: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    method: str,
    base_models: Sequence[str],
    recipe_yaml: str = "",
    model_dir: str | Path | None = None,
    notes: str = "",
    files: Mapping[str, str | bytes] | None = None,
    overwrite: bool = False,
    shard_size: int = 5 * 2**30,
    inputs: Sequence[str | Path] = (),
    head_meta: Mapping[str, HeadMeta] | None = None,
    base_dir: str | Path | None = None,
) -> Path:
    """Write a data-driven merge (a Hugging Face directory); returns ``out``.

    ``state`` is the whole merged state dict; each task's head goes to ``heads/<task>.*``
    (:mod:`supermerge.engine.heads`, with its record ``head_meta[task]``: the expert's
    config, path, layout and class names), and
    the model's own head tensors are the first task's (``model_dir``, the first expert's
    folder, gives the config that names its classes): never a newly initialised one. The
    config/tokenizer files of ``base_dir`` then ``model_dir`` (replacing), the model
    card (with ``notes``), the recipe and ``files`` (name -> text or bytes) are published
    with the weights atomically by the checkpoint writer: a failure leaves no output.
    ``inputs`` (the models and data merged) go to the output guard, which also checks the
    free disk space before anything is written. Costs nothing beyond ``state``: each
    tensor is written straight to its place.
    """
    state = _with_first_head(state, heads)
    layout = [(name, tuple(t.shape), t.dtype) for name, t in state.items()]
    with CheckpointWriter(out, overwrite=overwrite, shard_size=shard_size, layout=layout,
                          inputs=inputs) as writer:
        for name, tensor in state.items():
            writer.add(name, tensor)
        for files_dir in dict.fromkeys([base_dir, model_dir]):
            writer.copy_model_files(Path(files_dir) if files_dir is not None else None)
        writer.write_model_card(base_models=list(base_models), method=method,
                                recipe_yaml=recipe_yaml, extra_markdown=notes + _heads_note(heads))
        writer.write_text("supermerge_recipe.yaml", recipe_yaml)
        heads_written = head_files(heads, head_meta)
        for name, data in {**(files or {}), **heads_written}.items():
            if isinstance(data, str):
                writer.write_text(name, data)
            else:
                writer.write_bytes(name, data)
        return writer.commit()


def _with_first_head(state: Mapping[str, torch.Tensor],
                     heads: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``state`` with its head tensors replaced by the first task's (same names and shapes)."""
    first = next(iter(heads.values()), {})
    return {name: first[name] if name in first and first[name].shape == tensor.shape
            else tensor for name, tensor in state.items()}


def export_learned(
    out: str | Path,
    merge: LearnedMerge,
    *,
    method: str,
    base_models: Sequence[str],
    recipe_yaml: str = "",
    model_dir: str | Path | None = None,
    overwrite: bool = False,
    shard_size: int = 5 * 2**30,
    inputs: Sequence[str | Path] = (),
    head_meta: Mapping[str, HeadMeta] | None = None,
    base_dir: str | Path | None = None,
    files: Mapping[str, str | bytes] | None = None,
    notes: str = "",
) -> Path:
    """Write the merged model (a Hugging Face directory) with its coefficients; returns ``out``.

    As :func:`export_model` (``files`` and ``notes`` too), plus the coefficients (JSON,
    CSV, safetensors, heatmap).
    Costs one merged copy of the weights in memory plus the writer's shard buffer.
    """
    from supermerge.plotting import can_plot

    fits = merge.fits
    files = {
        **(files or {}),
        "coefficients.json": coefficients_json(fits, merge.selection, merge.chosen),
        "coefficients.csv": coefficients_csv(fits),
        "coefficients.safetensors": coefficient_tensors(fits),
    }
    if can_plot("coefficients.png"):  # matplotlib is the `plot` extra
        files["coefficients.png"] = plot_coefficients(fits)
    return export_model(out, merge.model.merged_state_dict(), merge.model.head_state_dicts(),
                        method=method, base_models=base_models, recipe_yaml=recipe_yaml,
                        model_dir=model_dir, notes=_card_notes(merge) + notes, files=files,
                        overwrite=overwrite, shard_size=shard_size, inputs=inputs,
                        head_meta=head_meta, base_dir=base_dir)


def _card_notes(merge: LearnedMerge) -> str:
    rows = [
        f"| {node} | {fit.objective} | {fit.best_step} of {fit.steps_run} | "
        f"{fit.train_loss:.4f} | "
        f"{'-' if fit.heldout_loss is None else f'{fit.heldout_loss:.4f}'} | "
        f"{'-' if fit.heldout_accuracy is None else f'{fit.heldout_accuracy:.3f}'} |"
        for node, fit in merge.fits.items()
    ]
    return (
        "## Learned coefficients\n\n"
        "Coefficients per expert and merge group are in `coefficients.json` / `.csv` / "
        "`.safetensors` and `coefficients.png`.\n\n"
        "The kept step has the lowest held-out loss of the objective; the held-out accuracy "
        "(classification tasks with labels) is reported beside it.\n\n"
        "| node | objective | kept step | train loss | held-out loss | held-out accuracy |\n"
        "|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + f"\n\nMerge tree:\n\n```\n{merge.tree.render()}\n```\n"
        + _selection_notes(merge)
    )


def _heads_note(heads: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    return "\n" + heads_card_note(list(heads)) if heads else ""


def _selection_notes(merge: LearnedMerge) -> str:
    if not merge.selection:
        return ""
    rows = "\n".join(f"| {label}{' (kept)' if label == merge.chosen else ''} | {loss:.4f} |"
                     for label, loss in merge.selection.items())
    return ("\nConfigurations fitted; the first is kept unless another has a lower held-out "
            "prediction loss in 95 % of paired bootstrap resamples of the held-out examples:\n\n"
            "| configuration | held-out prediction loss |\n|---|---|\n" + rows + "\n")


def export_outcome(out: str | Path, outcome: LearnedOutcome, **written: Any) -> Path:
    """Write a learned method's outcome; returns ``out``: with its coefficients
    (:func:`export_learned`) when the method trained them, else the merged weights and
    heads (:func:`export_model`); either with the outcome's own files and notes beside
    them. ``written`` are those functions' keywords."""
    extra = {"files": outcome.files, "notes": outcome.notes}
    if outcome.merge is not None:
        return export_learned(out, outcome.merge, **extra, **written)
    return export_model(out, outcome.state, outcome.heads, **extra, **written)
