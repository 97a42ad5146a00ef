"""`rtllm fiber`: walk particles along the fiber of a trained LM, fit a map, write two ensembles."""
from __future__ import annotations

import argparse


def add_fiber_args(p: argparse.ArgumentParser) -> None:
    from rtllm.run.fiber_config import MAPS, FiberConfig  # no torch: the parser stays light

    d = FiberConfig.__dataclass_fields__
    a = p.add_argument
    a("--model", required=True, help="Hugging Face model directory: the trained weights (the MAP) to walk from")
    a("--train", nargs="+", required=True, help="training text files or directories")
    a("--heldout", nargs="+", help="held-out text for the tolerance checks (default: the end of --train)")
    a("--out", required=True, help="output directory: walk/ and generated/ ensembles, fiber.json")
    for name, kind, text in (
            ("particles", int, "particles K, each with its own drift direction"),
            ("steps", int, "walk steps (gradients) per particle"),
            ("lr", float, "step size eta of x <- x + eta (beta d - grad loss)"),
            ("drift", float, "drift beta (x moves lr*drift along d per step)"),
            ("tolerance", float, "keep iterates within this many nats/token of the start's held-out loss"),
            ("thin", int, "steps between kept iterates"),
            ("max-pullback", int, "gradient steps without drift before a particle outside the tolerance stops"),
            ("rank", int, "dimension k of the learned map"),
            ("generated", int, "samples drawn from the map (no gradients)"),
            ("batch-size", int, "sequences per minibatch"),
            ("seq-len", int, "tokens per sequence"),
            ("eval-sequences", int, "held-out sequences of the evaluation batch"),
            ("seed", int, "seed of drift directions, data order and map")):
        a(f"--{name}", type=kind, default=d[name.replace("-", "_")].default, help=f"{text} (%(default)s)")
    a("--tangent", action="store_true", help="remove the drift's component along the gradient")
    a("--map", choices=MAPS, default=d["map"].default, help="learned map: PCA subspace with scales, or an MLP "
      "on its coordinates (%(default)s)")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto (%(default)s)")
    a("--overwrite", action="store_true", help="replace an earlier rtllm run in --out")
    a("--resume", action="store_true", help="continue the run in --out: particles already done are "
      "kept, the others walked again (the output equals an uninterrupted run's)")


def cmd_fiber(args: argparse.Namespace) -> int:
    from rtllm.run.fiber import fiber
    from rtllm.run.fiber_config import FiberConfig

    cfg = FiberConfig(model=args.model, train=tuple(args.train), heldout=tuple(args.heldout) if args.heldout else None,
                      out=args.out, particles=args.particles, steps=args.steps, lr=args.lr, drift=args.drift,
                      tangent=args.tangent, tolerance=args.tolerance, thin=args.thin,
                      max_pullback=args.max_pullback, map=args.map, rank=args.rank, generated=args.generated,
                      batch_size=args.batch_size, seq_len=args.seq_len, eval_sequences=args.eval_sequences,
                      seed=args.seed, device=args.device)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite replaces it: pass one")
    fiber(cfg, overwrite=args.overwrite, resume=args.resume)
    return 0
