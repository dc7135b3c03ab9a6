"""The `fedtune` command: run a whole job locally, run one role (what a pod runs), and the tools around it.

One module per group of commands (`jobs`, `models`, `tools`), each adding its parsers and handlers.
Heavy imports (torch, transformers) happen inside the commands that need them, so the
scheduler, `validate` and `import-xfl` start fast and run without the training stack.
Nothing below the command line imports it: exit codes live in `fedtune.exits`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from fedtune import __version__, logs, roles
from fedtune.cli import jobs, models, tools
from fedtune.exits import EXIT_BAD_INPUT, EXIT_CODES, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_REFUSED
from fedtune.spec import SpecError
from fedtune.spec.terms import TermsRefused

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _setup_logging(name: str, level: str) -> None:
    logs.setup(name, level)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description=__doc__.splitlines()[0], epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        default=os.environ.get(roles.LOG_LEVEL_ENV, "INFO").upper(),
                        help="for this command and, under `run`, every role it starts (default: "
                        "$FEDTUNE_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict = {}
    for group in (jobs, models, tools):
        handlers.update(group.add_parsers(sub))
    parser.set_defaults(handlers=handlers)
    return parser


def _log_name(args: argparse.Namespace) -> str:
    name = getattr(args, "party", None) or args.command
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    return name if rank == "0" else f"{name}[rank {rank}]"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # a party with several ranks starts itself again under torchrun
    _setup_logging(_log_name(args), args.log_level)
    try:
        return args.handlers[args.command](args)
    except (SpecError, ValueError, FileNotFoundError) as err:
        print(f"fedtune {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TermsRefused as err:
        print(f"fedtune {args.command}: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except OSError as err:  # the machine's state (a full disk, a folder gone): one line, not a traceback
        print(f"fedtune {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _terminate_on_sigterm_as_init() -> None:
    """As a container's first process (PID 1: no init in the trainer image), a signal with its
    default action is ignored: `kubectl delete pod` would leave the role working through the
    whole grace period, then SIGKILL. End on SIGTERM as any other process would."""
    if os.getpid() == 1:
        signal.signal(signal.SIGTERM, lambda signum, _frame: os._exit(128 + signum))


def entry() -> None:
    """The `fedtune` executable. When a command loaded torch and transformers, leave without the
    interpreter's teardown of those modules: it costs over a second of CPU per process, paid by
    every party of a job at the same moment. Everything written is closed by then."""
    _terminate_on_sigterm_as_init()
    code = main()
    if "torch" in sys.modules:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
