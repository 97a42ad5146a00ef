"""`rtllm generate`: the options, and the command that calls rtllm.evaluation.generation."""
from __future__ import annotations

import argparse
import sys
import tempfile

from rtllm.cli.evaluate import add_offload_args


def add_generate_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--ensemble", required=True, help="output directory of a sampling run (ensemble.json)")
    a("--prompt", required=True, help="text to continue")
    a("--max-new-tokens", type=int, default=40, help="tokens to generate (%(default)s)")
    a("--max-samples", type=int, help="use that many samples, evenly spaced (default: all)")
    a("--sample", action="store_true", help="draw each token from the BMA instead of taking its argmax")
    a("--temperature", type=float, default=1.0, help="with --sample (%(default)s)")
    a("--top-k", type=int, help="with --sample: only the k most probable tokens")
    a("--top-p", type=float, help="with --sample: the smallest set of tokens with this much mass")
    a("--seed", type=int, default=0, help="with --sample (%(default)s)")
    a("--device", default="auto", help="cpu, cuda, cuda:N or auto (%(default)s)")
    a("--html", default="rtllm-generate.html", help="page to write (%(default)s)")
    a("--color", choices=["auto", "always", "never"], default="auto",
      help="color the terminal output by epistemic uncertainty (auto: when stdout is a terminal)")
    add_offload_args(p)


def cmd_generate(args: argparse.Namespace) -> int:
    from rtllm.evaluation.ensemble_lm import EnsembleForCausalLM

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.offload is None and (args.offload_host is not None or args.offload_dir is not None):
        raise ValueError("--offload-host and --offload-dir go with --offload (the bytes of each sample "
                         "to keep on the device)")
    with tempfile.TemporaryDirectory(prefix="rtllm-offload-") as scratch:
        if args.offload is None:
            lm = EnsembleForCausalLM.from_ensemble(args.ensemble, max_samples=args.max_samples,
                                                   device=args.device, mask="manifest")
        else:  # every sample dispatched by accelerate, its layers that do not fit offloaded
            from rtllm.evaluation.offload import offload_memory
            from rtllm.lm.model_io import resolve_device

            budget = offload_memory(resolve_device(args.device), args.offload, args.offload_host)
            lm = EnsembleForCausalLM.from_ensemble(args.ensemble, max_samples=args.max_samples,
                                                   mask="manifest", max_memory=budget,
                                                   offload_dir=args.offload_dir or scratch)
        return _generate(lm, args)


def _generate(lm, args: argparse.Namespace) -> int:
    from rtllm.evaluation.generation import generate_text, terminal_text, write_generation

    gen = generate_text(lm, args.prompt, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(terminal_text(gen, color=color))
    path = write_generation(gen, args.html)
    print(f"rtllm generate: {len(gen.tokens)} tokens from {gen.n_samples} samples, mean epistemic "
          f"{gen.summary()['mean epistemic']:.4g} nats; wrote {path}", file=sys.stderr)
    return 0
