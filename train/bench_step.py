"""Online training cost at a target *shape*, with random weights: no model download, no data, no DeepSpeed.

    python -m train.bench_step --shape llama3-8b --batch-size 4 --seq-len 2048 --dtype bfloat16
    python -m train.bench_step --shape smollm2-135m --drafters eagle3 --ttt-steps 3 --dtype float32
    python -m train.bench_step --shape smollm2-135m --drafters peagle --cod-ratio 0.7 --dtype float32

train.step_time measures a config's real recipe (real target, real data, the DeepSpeed engine) on this machine;
this measures the same objectives (train/objectives.py, train/eagle_objective.py) at shapes nobody can download
here, e.g. a Llama-3-8B-shaped target on a GPU. For each drafter: one training step (the objective's forward,
which runs the target under no_grad, the drafter's backward, a torch AdamW step on weights in --dtype, as
DeepSpeed's bf16 mode computes them) divided by the target's forward alone on the same batch (the quantity
EAGLE's issue asks <= 1.5 of). Random tokens; the last --assistant share of every row is supervised. Median of
--repeats after --warmup runs, the device synchronised around each; peak device memory per drafter on CUDA.
"""
from __future__ import annotations

import json
import statistics

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cli.errors import ArgumentParser, run_main
from drafters import EagleModel, MedusaModel
from drafters.draft_lm import build_draft_lm
from inference.calibrate import run_seconds
from target.model import target_forward
from train.eagle_objective import Eagle1Objective, Eagle3Objective
from train.objectives import DraftLMObjective, MedusaObjective

SHAPES = {  # LlamaConfig fields of targets of known size
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
DRAFTERS = ("medusa", "eagle1", "eagle3", "peagle", "draft_lm")


def random_target(shape: str, dtype: torch.dtype, device: str) -> LlamaForCausalLM:
    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: use one of {', '.join(SHAPES)}")
    torch.manual_seed(0)
    with torch.device(device):
        target = LlamaForCausalLM._from_config(LlamaConfig(**SHAPES[shape]), attn_implementation="sdpa", dtype=dtype)
    return target.eval().requires_grad_(False)


def random_batch(vocab: int, batch_size: int, seq_len: int, assistant: float, device: str) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, loss_mask [B, T]: random tokens, the last `assistant` share of each row supervised."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(vocab, (batch_size, seq_len), generator=gen)
    loss_mask = torch.zeros_like(ids)
    loss_mask[:, seq_len - int(seq_len * assistant):] = 1
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "loss_mask": loss_mask.to(device)}


def objective_for(kind: str, target: LlamaForCausalLM, args) -> torch.nn.Module:
    """The module DeepSpeed would wrap for `kind`, its drafter in the target's dtype and device."""
    weight = target.get_input_embeddings().weight
    if kind == "medusa":
        drafter = MedusaModel.from_target(target, num_heads=4, num_layers=1)
        make = lambda d: MedusaObjective(d, target)  # noqa: E731
    elif kind == "eagle1":
        drafter = EagleModel.from_target(target, version=1)
        make = lambda d: Eagle1Objective(d, target)  # noqa: E731
    elif kind in ("eagle3", "peagle"):  # P-EAGLE: the ttt steps are its depths, drafted with placeholders
        vocab = list(range(min(args.draft_vocab, target.config.vocab_size)))
        parallel = args.ttt_steps if kind == "peagle" else None
        drafter = EagleModel.from_target(target, version=3, draft_vocab=vocab, parallel_drafts=parallel)
        make = lambda d: Eagle3Objective(d, target, args.ttt_steps, cod_ratio=args.cod_ratio,  # noqa: E731
                                         cod_min=args.cod_min)
    elif kind == "draft_lm":
        return DraftLMObjective(build_draft_lm(target, num_layers=2), target, {"forward_kl": 1.0}).train()
    else:
        raise ValueError(f"drafter {kind!r}: use {', '.join(DRAFTERS)}")
    return make(drafter.to(device=weight.device, dtype=weight.dtype)).train()


def measure(kind: str, target, batch: dict, args) -> dict:
    """Seconds of the target forward alone and of one training step of `kind`, and what the step changed."""
    objective = objective_for(kind, target, args)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, foreach=True)
    layers = getattr(getattr(objective.drafter, "config", None), "feature_layers", None)
    first = params[0].detach().clone()

    def target_only():
        with torch.no_grad():
            target_forward(target, batch["input_ids"], batch["attention_mask"], logits_at=0, use_cache=False,
                           feature_layers=layers)

    def train_step():
        loss, _ = objective(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step = statistics.median(run_seconds(train_step, args.repeats, args.warmup))
    fwd = statistics.median(run_seconds(target_only, args.repeats, args.warmup))
    row = {"drafter": kind, "trainable_params": sum(p.numel() for p in params), "target_forward_s": fwd,
           "train_step_s": step, "ratio": step / fwd,
           "tokens_per_s": batch["input_ids"].numel() / step,
           "first_param_changed": not torch.equal(first, params[0].detach())}
    if torch.cuda.is_available():
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--shape", default="smollm2-135m", help=", ".join(SHAPES))
    p.add_argument("--drafters", default=",".join(DRAFTERS))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--assistant", type=float, default=0.6, help="supervised share of every row")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--ttt-steps", type=int, default=7)
    p.add_argument("--draft-vocab", type=int, default=32000)
    p.add_argument("--cod-ratio", type=float, help="eagle3/peagle: COD down-sampling of deep steps (drafter.cod_ratio)")
    p.add_argument("--cod-min", type=float, default=0.2, help="COD's floor (drafter.cod_min)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--output", help="write the rows as JSON here")
    args = p.parse_args(argv)
    if not 0 < args.assistant <= 1:
        p.error(f"--assistant {args.assistant}: a share in (0, 1]")
    for name, low in (("batch_size", 1), ("seq_len", 4), ("ttt_steps", 1), ("draft_vocab", 1), ("repeats", 1),
                      ("warmup", 0)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least {low}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is visible here; use --device cpu")
    for name in ("cod_ratio", "cod_min"):
        value = getattr(args, name)
        if value is not None and not 0 < value <= 1:
            p.error(f"--{name.replace('_', '-')} {value}: a share in (0, 1]")
    kinds = args.drafters.split(",")
    for k in kinds:
        if k not in DRAFTERS:
            p.error(f"--drafters: {k!r} is not one of {', '.join(DRAFTERS)}")
    target = random_target(args.shape, getattr(torch, args.dtype), args.device)
    batch = random_batch(target.config.vocab_size, args.batch_size, args.seq_len, args.assistant, args.device)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"target {args.shape} ({sum(p.numel() for p in target.parameters()) / 1e9:.2f} B params, random weights, "
          f"{args.dtype}) on {device}; batch {args.batch_size} x {args.seq_len}, {args.assistant:.0%} supervised; "
          f"median of {args.repeats}")
    rows = []
    for kind in kinds:
        row = measure(kind, target, batch, args)
        ttt = kind in ("eagle3", "peagle")
        row.update(shape=args.shape, dtype=args.dtype, device=device, batch=[args.batch_size, args.seq_len],
                   ttt_steps=args.ttt_steps if ttt else None, cod_ratio=args.cod_ratio if ttt else None)
        rows.append(row)
        mem = f", peak {row['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in row else ""
        print(f"{kind:9s} {row['trainable_params'] / 1e6:9.1f} M trainable | target forward "
              f"{row['target_forward_s'] * 1e3:9.1f} ms | training step {row['train_step_s'] * 1e3:9.1f} ms | "
              f"ratio {row['ratio']:.2f} | {row['tokens_per_s']:,.0f} tokens/s{mem}", flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    run_main(main)
