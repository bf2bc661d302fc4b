"""`supermerge demo` until the offline benchmark lands: a real merge of models it builds.

It builds a tiny BERT classifier (random init, seeded) as the base, fine-tunes one expert
per synthetic task ("does the sequence contain token T?", a different T per task), saves
them as Hugging Face model directories, merges them with every data-free method in the
registry through the same engine as `supermerge merge`, reloads each merged model with
transformers and reports per-task accuracy. About a minute on two CPU cores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from supermerge.api import merge
from supermerge.methods import available_methods

TASK_TOKENS = (10, 11, 12)
VOCAB, SEQ_LEN = 64, 12


def make_task(token: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (input_ids, labels): label 1 where ``token`` occurs in the sequence."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(20, VOCAB, (n, SEQ_LEN), generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    where = torch.randint(1, SEQ_LEN, (n,), generator=gen)
    ids[labels == 1, where[labels == 1]] = token
    ids[:, 0] = 2  # [CLS]
    return ids, labels


def tiny_bert(seed: int = 0):
    """A seeded, randomly initialised 2-layer BERT classifier (about 30 k parameters)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=SEQ_LEN, num_labels=2)
    return BertForSequenceClassification(config)


def fine_tune(model, ids, labels, steps: int = 120, seed: int = 0):
    """Adam fine-tuning on one task; returns the model (trained in place)."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(ids), (32,), generator=gen)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, ids, labels) -> float:
    """Fraction of correct predictions."""
    return float((model(input_ids=ids).logits.argmax(-1) == labels).float().mean())


def _recipe(method_name: str, base: Path, experts: list[Path]) -> dict:
    models = experts[:2] if method_name in {"slerp", "nuslerp"} else experts
    models = experts[:1] if method_name == "passthrough" else models
    return {
        "merge_method": method_name,
        "base_model": str(base),
        "models": [{"model": str(p)} for p in models],
        "parameters": {"t": 0.5} if "slerp" in method_name else {},
    }


def run_demo(out: Path, echo: Callable[[str], None] = print) -> dict:
    """Build, merge, evaluate; writes ``results.json`` and ``results.md`` into ``out``."""
    from transformers import BertForSequenceClassification

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    tasks = {f"contains-{t}": (make_task(t, 512, seed=t), make_task(t, 512, seed=100 + t))
             for t in TASK_TOKENS}
    base_dir = out / "base"
    base = tiny_bert(seed=0)
    base.save_pretrained(base_dir)
    experts, results = [], {"experts": {}, "methods": {}}
    for i, (name, (train, test)) in enumerate(tasks.items()):
        expert = fine_tune(tiny_bert(seed=0), *train, seed=i)
        experts.append(out / f"expert-{name}")
        expert.save_pretrained(experts[-1])
        results["experts"][name] = accuracy(expert, *test)
        echo(f"expert {name}: test accuracy {results['experts'][name]:.3f}")
    for method in available_methods():
        if method.needs != "none":
            continue
        target = out / f"merged-{method.name}"
        started = time.perf_counter()
        merge(_recipe(method.name, base_dir, experts), target, overwrite=True)
        seconds = time.perf_counter() - started
        merged = BertForSequenceClassification.from_pretrained(target).eval()
        per_task = {name: accuracy(merged, *test) for name, (_, test) in tasks.items()}
        results["methods"][method.name] = {
            "per_task": per_task, "average": sum(per_task.values()) / len(per_task),
            "seconds": seconds}
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = _markdown(results, list(tasks))
    (out / "results.md").write_text(table)
    echo(table)
    echo(f"models and results in {out.resolve()}")
    return results


def _markdown(results: dict, tasks: list[str]) -> str:
    head = "| model | " + " | ".join(tasks) + " | average | merge s |"
    rows = [head, "|" + "---|" * (len(tasks) + 3)]
    experts = results["experts"]
    rows.append("| each task's own expert | " + " | ".join(f"{experts[t]:.3f}" for t in tasks)
                + f" | {sum(experts.values()) / len(experts):.3f} | |")
    for name, row in results["methods"].items():
        rows.append(f"| {name} | " + " | ".join(f"{row['per_task'][t]:.3f}" for t in tasks)
                    + f" | {row['average']:.3f} | {row['seconds']:.2f} |")
    return "\n".join(rows) + "\n"
