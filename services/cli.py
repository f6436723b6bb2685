"""The `c2cserve` command line.

Each subcommand lives in its own module, imported only when that subcommand runs, so
`c2cserve gateway` never imports torch. A command module exposes two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int     # the process exit code

Errors a user can cause are raised as `services.errors.C2CError` and printed as one line
(exit code 2), never as a stack trace. An incomplete command (`c2cserve`, `c2cserve
models`) prints its group's help, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# Torch's OpenMP threads and Numba's parallel threads spin against each other on small
# machines: with spinning OpenMP a batched 0.5B decode step took 3.1 s instead of 0.8 s.
# Must be set before torch is imported, so it lives at the very top of the entry point.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# command path -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("up",): ("services.launcher", "run the whole system locally (embedded NATS + Redis)"),
    ("gateway",): ("gateway.service", "run the HTTP gateway (OpenAI-compatible API)"),
    ("placer",): ("placer.service", "run the placer (routing, prewarming)"),
    ("controller",): ("controller.service", "run the feedback controller"),
    ("worker",): ("worker.service", "run workers, one per GPU or CPU slice"),
    ("models", "synth"): ("worker.synth", "write a random-initialized HF checkpoint"),
    ("models", "gguf"): ("worker.gguf_checkpoint", "convert a .gguf model file into a cached checkpoint folder"),
    ("generate",): ("worker.generate", "run one request through the engine"),
    ("tenants", "check"): ("services.tenants", "validate a tenants file (keys, private models, limits)"),
    ("bench", "engine"): ("bench.engine", "engine prefill/decode tokens/s vs transformers"),
    ("bench", "kernels"): ("bench.kernels", "HybridGEMM bandwidth vs torch, roofline"),
    ("bench", "overhead"): ("bench.overhead", "control-plane latency added by the services"),
    ("bench", "coldstart"): ("bench.coldstart", "what a cold start adds, host store vs load-on-demand"),
    ("bench", "serve"): ("bench.serve", "replay a serverless trace against each residency mode"),
    ("bench", "faults"): ("bench.faults", "kill -9 and pause each process under load: wrong, failed, recovery"),
    ("bench", "soak"): ("bench.soak", "memory of every process over many requests"),
    ("bench", "rotate"): ("bench.rotate", "recompute preemption vs KV rotation to host memory, one burst"),
    ("bench", "migrate"): ("bench.migrate", "live migration downtime vs context length, shm and network"),
    ("bench", "reconfig"): ("bench.reconfig", "switch a model between 1 and 2 pipeline stages under load"),
    ("bench", "pipeline-burst"): ("bench.pipeline_burst", "a burst on one model: pinned whole vs pipeline policy"),
    ("sim",): ("sim.cli", "discrete-event cluster simulation of the policies"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="c2cserve", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    # not `required`: argparse would name the dest in its error; an incomplete command
    # prints its group's help instead (main)
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(
        dest="command", metavar="COMMAND", title="commands")}
    for path, (module_name, help_text) in COMMANDS.items():
        for depth in range(1, len(path)):
            prefix = path[:depth]
            if prefix not in groups:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands",
                                                     description=f"c2cserve {' '.join(prefix)} commands")
                groups[prefix] = sub.add_subparsers(dest=f"command_{depth}", metavar="COMMAND", title="commands")
        sub = groups[path[:-1]].add_parser(path[-1], help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
    return parser


def _add_module_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Find the command's parser, let its module add its own arguments, then parse."""
    sub = _find_subparser(parser, argv)
    module_name = sub.get_default("_module")
    if module_name is None:  # no complete command: --help, a usage error, or the group's help
        parser.parse_args(argv)
        sub.print_help(sys.stderr)
        sub.exit(2)
    module = importlib.import_module(module_name)
    module.add_arguments(sub)
    args = parser.parse_args(argv)
    args._run = module.run
    return args


def _find_subparser(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.ArgumentParser:
    current = parser
    for token in argv:
        actions = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or token not in actions[0].choices:
            continue
        current = actions[0].choices[token]
    return current


def main(argv: list[str] | None = None) -> int:
    from services.errors import C2CError

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = _add_module_arguments(parser, argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except C2CError as exc:
        print(f"c2cserve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
