"""Small random Llama in PyTorch: AdamW, galore-torch and galorax.torch (both sides), APOLLO.

Trains transformers' ``LlamaForCausalLM`` built from a config (random init, no hub) on the bytes
of the Python standard library's top-level sources (every 10th file held out for evaluation),
with each optimizer at each learning rate of its sweep on the first seed, then the best lr on
every other seed. Reports the final eval loss (nats/byte) and the optimizer-state bytes.

Runs (GaLore ones on every attention/MLP matrix of the decoder layers, rank ``--rank``, the
same gap and scale; embeddings, norms and head full-rank):

* ``adamw``: ``torch.optim.AdamW``;
* ``galore-torch``: galore-torch 1.0's ``GaLoreAdamW``, its default ``proj_type='std'``;
* ``galorax``: ``galorax.torch.GaLoreAdamW`` with its defaults (side ``'std'``, chosen by
  this benchmark);
* ``galorax-auto``: the same with ``side='auto'`` (least state; the default before);
* ``galorax-std``: the same with ``side='std'`` given explicitly (galore-torch's side);
* ``apollo``: ``apollo_torch.APOLLOAdamW`` (rank ``--rank``, channel scaling), if importable.

Usage::

    pip install torch transformers && pip install galore-torch --no-deps
    nice -n 10 python benchmarks/torch_llama.py [--steps 300] [--runs galorax,galorax-std]

Prints one line per run and then the Markdown table of BENCHMARKS.md ("Small Llama in
PyTorch"). One thread (``torch.set_num_threads(1)``) unless ``--threads``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "torch"))
from galorax_torch_testlib import load_galore_torch  # noqa: E402  (the tests' loader)

from galorax.torch import GaLoreAdamW  # noqa: E402

#: The learning-rate sweeps, centred on each run's best in BENCHMARKS.md (GaLore runs, scale
#: 0.25, want a far larger lr than AdamW).
SWEEPS: dict[str, tuple[float, ...]] = {
    "adamw": (5e-4, 1e-3, 2e-3),
    "galore-torch": (2e-2, 4e-2, 8e-2),
    "galorax": (2e-2, 4e-2, 8e-2),
    "galorax-auto": (1e-2, 2e-2, 4e-2),
    "galorax-std": (2e-2, 4e-2, 8e-2),
    "apollo": (1e-2, 2e-2, 4e-2),
}
DEFAULT_RUNS = "adamw,galore-torch,galorax,galorax-auto,apollo"


def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor]:
    """(train, eval) byte streams: the stdlib's top-level .py files, sorted, every 10th held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, held = bytearray(), bytearray()
    for i, f in enumerate(files):
        (held if i % 10 == 9 else train).extend(f.read_bytes())
    return torch.tensor(list(train)), torch.tensor(list(held))


def batches(data: torch.Tensor, n: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """``n`` batches of random windows of ``seq`` bytes (fixed by ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq, (n, batch), generator=gen)
    return [torch.stack([data[s : s + seq] for s in row.tolist()]) for row in starts]


def make_model(args: argparse.Namespace, seed: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def split_params(model: torch.nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(the decoder layers' attention/MLP matrices, everything else)."""
    low: list[torch.Tensor] = []
    rest: list[torch.Tensor] = []
    for name, p in model.named_parameters():
        is_target = ("self_attn" in name or "mlp" in name) and p.dim() == 2
        (low if is_target else rest).append(p)
    return low, rest


def make_optimizer(kind: str, model: torch.nn.Module, lr: float, args: argparse.Namespace):
    low, rest = split_params(model)
    galore = {"rank": args.rank, "update_proj_gap": args.gap, "scale": args.scale}
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if kind == "galore-torch":
        gt = load_galore_torch()
        if gt is None:
            raise SystemExit("galore-torch is needed: pip install galore-torch --no-deps")
        groups = [{"params": rest}, {"params": low, **galore, "proj_type": "std"}]
        return gt.GaLoreAdamW(groups, lr=lr, no_deprecation_warning=True)
    if kind.startswith("galorax"):
        side = {"galorax": {}, "galorax-std": {"side": "std"}, "galorax-auto": {"side": "auto"}}
        if kind not in side:
            raise SystemExit(f"--runs: unknown run {kind!r}; choose from {sorted(SWEEPS)}")
        return GaLoreAdamW([{"params": rest}, {"params": low, **galore, **side[kind]}], lr=lr)
    if kind == "apollo":
        from apollo_torch import APOLLOAdamW  # type: ignore[import-not-found]

        apollo = {**galore, "proj": "random", "scale_type": "channel", "scale": 1.0}
        return APOLLOAdamW([{"params": rest}, {"params": low, **apollo, "proj_type": "std"}], lr=lr)
    raise SystemExit(f"--runs: unknown run {kind!r}; choose from {sorted(SWEEPS)}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer state (galore-torch's projector objects too)."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            tensors = [v] if torch.is_tensor(v) else list(getattr(v, "__dict__", {}).values())
            total += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
    return total


def lr_lambda(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine to 10%."""

    def f(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        x = (t - warmup) / max(1, steps - warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * x))

    return f


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(float(model(input_ids=x, labels=x).loss) for x in data) / len(data)
    model.train()
    return loss


def train(kind: str, lr: float, seed: int, args: argparse.Namespace, corpus) -> dict[str, Any]:
    train_data, eval_batches = corpus
    model = make_model(args, seed)
    opt = make_optimizer(kind, model, lr, args)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps, args.warmup))
    t0 = time.process_time()
    for x in batches(train_data, args.steps, args.batch, args.seq, seed + 1000):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    cpu = time.process_time() - t0
    final = evaluate(model, eval_batches)
    return {"kind": kind, "lr": lr, "seed": seed, "eval": final, "bytes": state_bytes(opt),
            "cpu_s": cpu, "train_loss": float(loss.detach())}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"comma list of {sorted(SWEEPS)}")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=344)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--gap", type=int, default=50)
    p.add_argument("--scale", type=float, default=0.25)
    p.add_argument("--seeds", default="0,1", help="sweep on the first, best lr on the others")
    p.add_argument(
        "--lrs", nargs="*", default=[], metavar="RUN=LR,LR", help="replace a run's lr sweep"
    )
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    train_data, held = stdlib_bytes()
    corpus = (train_data, batches(held, args.eval_batches, args.batch, args.seq, seed=12345))
    seeds = [int(s) for s in args.seeds.split(",")]
    for spec in args.lrs:
        kind, _, lrs = spec.partition("=")
        if kind not in SWEEPS or not lrs:
            raise SystemExit(f"--lrs: expected RUN=LR[,LR...] with RUN in {sorted(SWEEPS)}")
        SWEEPS[kind] = tuple(float(x) for x in lrs.split(","))
    kinds = [k for k in args.runs.split(",") if k]
    if "apollo" in kinds:
        try:
            import apollo_torch  # type: ignore[import-not-found]  # noqa: F401
        except ImportError:
            print("apollo_torch is not importable: skipping apollo", flush=True)
            kinds.remove("apollo")
    print(f"torch {torch.__version__}, {args}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {}
    for kind in kinds:
        sweep = [train(kind, lr, seeds[0], args, corpus) for lr in SWEEPS[kind]]
        for r in sweep:
            print(f"{kind} lr={r['lr']:g} seed={r['seed']}: eval {r['eval']:.4f} "
                  f"({r['cpu_s']:.0f} CPU-s)", flush=True)  # fmt: skip
        best = min(sweep, key=lambda r: r["eval"])
        others = [train(kind, best["lr"], s, args, corpus) for s in seeds[1:]]
        for r in others:
            print(f"{kind} lr={r['lr']:g} seed={r['seed']}: eval {r['eval']:.4f}", flush=True)
        results[kind] = [best, *others]
        results[kind + "/sweep"] = sweep
    print_table(results, kinds, seeds)


def print_table(results: dict[str, list[dict[str, Any]]], kinds: list[str], seeds: list[int]):
    print()
    seed_cols = " | ".join(f"eval loss seed {s}" for s in seeds)
    print(f"| run | lr sweep (seed {seeds[0]}) | best lr | {seed_cols} | mean | state bytes |")
    print("|---|---|---|" + "---|" * len(seeds) + "---|---|")
    adamw = results.get("adamw", [{}])[0].get("bytes")
    for kind in kinds:
        rows = results[kind]
        sweep = ", ".join(f"{r['lr']:g}: {r['eval']:.4f}" for r in results[kind + "/sweep"])
        mean = sum(r["eval"] for r in rows) / len(rows)
        share = f" ({100 * rows[0]['bytes'] / adamw:.0f}%)" if adamw else ""
        evals = " | ".join(f"{r['eval']:.4f}" for r in rows)
        print(f"| {kind} | {sweep} | {rows[0]['lr']:g} | {evals} | {mean:.4f} "
              f"| {rows[0]['bytes']:,}{share} |")  # fmt: skip


if __name__ == "__main__":
    main()
