"""The `fedtune` command: run a whole job locally, run one role (what a pod runs), and the tools around it.

Heavy imports (torch, transformers) happen inside the commands that need them, so the
scheduler, `validate` and `import-xfl` start fast and run without the training stack.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from fedtune import __version__, logs, roles
from fedtune.spec import FederatedFineTune, SpecError, expand_output_path, load_job, resolve_path

log = logging.getLogger("fedtune")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 124, 130
EXIT_CODES = f"""exit codes:
  0    success
  {EXIT_FAILED}    the job failed (a party's error and the tail of its log are printed)
  {EXIT_BAD_INPUT}    bad input: the job file, a dataset, a model folder, a path or an option; nothing was
       started and nothing written
  {EXIT_TIMEOUT}  fedtune run --timeout expired; every role was stopped
  {EXIT_INTERRUPTED}  interrupted"""
DEFAULT_ROLE_OUTPUT = "output/[JOB_ID]/[NODE_ID]"  # a role's adapters without --output or spec.output.path


def _setup_logging(name: str, level: str) -> None:
    logs.setup(name, level)
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _role_args(parser: argparse.ArgumentParser, party: bool) -> None:
    parser.add_argument("--job", required=True, type=Path, help="the FederatedFineTune YAML")
    if party:
        parser.add_argument("--party", required=True, help="this party's name in spec.parties")
    parser.add_argument("--base-dir", type=Path, help="folder relative spec paths resolve against "
                        "(default: the job file's folder)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--output", type=Path, help="write this party's adapters to OUTPUT/<party>/ "
                        f"(default: spec.output.path, else {DEFAULT_ROLE_OUTPUT})")
    output.add_argument("--output-dir", type=Path, help="write this party's adapters to exactly this folder")
    parser.add_argument("--listen", help="gRPC bind address (default: all interfaces, the port of the spec address)")
    parser.add_argument("--tls-dir", type=Path, default=os.environ.get(roles.TLS_DIR_ENV) or None,
                        help="folder with ca.crt, tls.crt, tls.key for mutual TLS")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description=__doc__.splitlines()[0], epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS,
                        default=os.environ.get(roles.LOG_LEVEL_ENV, "INFO").upper(),
                        help="for this command and, under `run`, every role it starts (default: "
                        "$FEDTUNE_LOG_LEVEL or INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run every role of a job on this machine", epilog=EXIT_CODES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("job", type=Path)
    run.add_argument("--output", type=Path, help="adapters land in OUTPUT/<party>/ (default: spec.output.path "
                     "with its [JOB_ID] and [NODE_ID] filled in, else fedtune-output/<party>/)")
    run.add_argument("--base-dir", type=Path, help="folder relative spec paths resolve against")
    run.add_argument("--timeout", type=float, default=24 * 3600,
                     help="stop every role and exit 124 after this many seconds")
    run.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in OUTPUT")
    run.add_argument("--gpus-per-party", type=int, metavar="N",
                     help="give every local party that trains N GPUs of its own (resources.gpu), one rank each")
    run.add_argument("--ranks-per-party", type=int, metavar="N",
                     help="train every local party that trains with N data-parallel ranks (parties[].ranks; "
                          "gloo ranks on the CPU)")

    for role, what in ((roles.SCHEDULER, "the scheduler role"), (roles.ASSIST_TRAINER, "the assist_trainer "
                       "(aggregator) role"), (roles.LABEL_TRAINER, "a label_trainer role")):
        _role_args(sub.add_parser(roles.SUBCOMMANDS[role], help=f"run {what}"), party=role != roles.SCHEDULER)

    chat = sub.add_parser("chat", help="answer prompts with a fine-tuned adapter, loading it once")
    chat.add_argument("--model", type=Path,
                      help="the pretrained model folder (default: the job's input.pretrained_model)")
    chat.add_argument("--adapter", type=Path, help="a checkpoint-<fraction> folder (omit for the base model)")
    chat.add_argument("--prompt", action="append", help="answer this prompt and exit; repeatable "
                      "(default: read prompts from stdin, one a line, until it ends)")
    chat.add_argument("--job", type=Path, help="prompts are queries, put in this job's dataset.prompt_pattern")
    chat.add_argument("--instruction", help="the instruction before each query (default with --job: that of the "
                      "job's first trainset file; without --job, the reference's prompt_pattern is used)")
    chat.add_argument("--device", default="auto", help="auto (a GPU where there is one), cpu, cuda, cuda:N")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy, the same answer every time")
    chat.add_argument("--top-p", type=float, default=1.0, help="sample from the most likely tokens whose "
                      "probabilities add up to this (with --temperature)")
    chat.add_argument("--seed", type=int, help="seed the sampling, for answers that can be repeated")

    tiny = sub.add_parser("tiny-model", help="build a tiny GLM-architecture model and tokenizer from QA data")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--data", required=True, type=Path, action="append", help="QA json file or folder (repeatable)")
    tiny.add_argument("--hidden-size", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--kind", choices=["glm", "glm4"], default="glm")
    tiny.add_argument("--pretrain-steps", type=int, default=200,
                      help="steps of language-model training on the data's texts (0: random weights)")
    tiny.add_argument("--vocab-size", type=int, help="the model's vocabulary width, at least the tokenizer's "
                      "(e.g. 130528, ChatGLM-6B's; default: the tokenizer's)")

    convert = sub.add_parser("convert", help="convert a ChatGLM2/3 or GLM-4 remote-code folder to a native GLM folder")
    convert.add_argument("src", type=Path, help="the folder with config.json (model_type chatglm) and its weights")
    convert.add_argument("dst", type=Path, help="the native folder to write (must not exist)")

    export = sub.add_parser("export-adapter", help="write a checkpoint trained on a converted ChatGLM model in "
                            "ChatGLM's own parameter names (for its inference code)")
    export.add_argument("checkpoint", type=Path, help="a checkpoint-<fraction> folder")
    export.add_argument("dst", type=Path, help="the folder to write (must not exist)")

    xfl = sub.add_parser("import-xfl", help="turn an XFL config folder into a job YAML that runs as XFL runs it")
    xfl.add_argument("config_dir", type=Path, help="the folder of fed_conf.json and trainer_config_<node>.json "
                     "(without fed_conf.json, the network comes from $__ENIGMA_FEDAPP_TASK_NETWORK__ and "
                     "$ENIGMA_redis_HOST, as XFL reads it)")
    xfl.add_argument("-o", "--out", type=Path, help="write here (default: stdout)")
    xfl.add_argument("--name", help="metadata.name of the job (default: the demo folder's name)")
    xfl.add_argument("--base-dir", type=Path, help="resolve the configs' relative paths against this folder "
                     "(default: XFL's, the folder holding its xfl.py above CONFIG_DIR)")
    xfl.add_argument("--local", action="append", metavar="NODE", help="a node run here (repeatable; default: "
                     "every node); the others become remote parties at their fed_conf address")

    report = sub.add_parser("report", help="loss curves (PNG) and an HTML page of a run's output folder")
    report.add_argument("output", type=Path, help="the output folder of `fedtune run` (holding summary.json)")
    report.add_argument("--to", type=Path, help="write here (default: OUTPUT/report)")

    validate = sub.add_parser("validate", help="check a job (schema, model folders, datasets, keys, rounds) "
                              "and print what it will do")
    validate.add_argument("job", type=Path)
    validate.add_argument("--base-dir", type=Path, help="folder relative spec paths resolve against "
                          "(default: the job file's folder)")
    validate.add_argument("--schema-only", action="store_true",
                          help="check only the schema (a job whose files are elsewhere, e.g. on a cluster)")

    certs = sub.add_parser("certs", help="make and inspect the federation's CA and party certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    ca = certs_sub.add_parser("ca", help="create a federation CA: OUT/ca.crt and OUT/ca.key")
    ca.add_argument("--out", required=True, type=Path)
    ca.add_argument("--name", default="federation")
    ca.add_argument("--force", action="store_true", help="replace an existing CA in OUT (its certificates stop "
                    "verifying)")
    issue = certs_sub.add_parser("issue", help="issue a party certificate: OUT/ca.crt, OUT/tls.crt, OUT/tls.key")
    issue.add_argument("--ca", required=True, type=Path, help="folder holding ca.crt and ca.key")
    issue.add_argument("--name", required=True, help="the party's name, exactly as in spec.parties")
    issue.add_argument("--out", required=True, type=Path)
    issue.add_argument("--dns", action="append", default=[], help="extra DNS name the party serves under")
    issue.add_argument("--ip", action="append", default=[], help="extra IP address the party serves under")
    issue.add_argument("--force", action="store_true", help="replace an existing certificate in OUT")
    show = certs_sub.add_parser("show", help="print a certificate's subject, names and validity")
    show.add_argument("cert", type=Path)
    return parser


def _party_output(job: FederatedFineTune, party: str, args: argparse.Namespace, base_dir: Path) -> Path:
    if args.output_dir is not None:
        return args.output_dir
    if args.output is not None:
        return args.output / party
    template = job.spec.output.path if job.spec.output is not None else DEFAULT_ROLE_OUTPUT
    return resolve_path(expand_output_path(template, job.job_id, party), base_dir)


def _listen(args: argparse.Namespace, role: str, address: str | None) -> str:
    return args.listen or roles.listen_address(role, address)


def _tls(args: argparse.Namespace):  # -> transport.TlsMaterial | None
    from fedtune import transport

    if not args.tls_dir:
        return None
    names = ("ca.crt", "tls.crt", "tls.key")
    missing = [n for n in names if not (args.tls_dir / n).is_file()]
    if missing:
        raise SpecError(f"--tls-dir {args.tls_dir}: missing {', '.join(missing)}")
    ca, cert, key = ((args.tls_dir / n).read_bytes() for n in names)
    return transport.TlsMaterial(ca=ca, cert=cert, key=key)


def cmd_run(args: argparse.Namespace) -> int:
    from fedtune.preflight import check_files

    job = load_job(args.job)
    if args.gpus_per_party is not None or args.ranks_per_party is not None:
        from fedtune.launcher import with_party_ranks

        source = f"{args.job} with --gpus-per-party/--ranks-per-party"
        job = with_party_ranks(job, source, gpus=args.gpus_per_party, ranks=args.ranks_per_party)
    base_dir = (args.base_dir or args.job.parent).resolve()
    samples = check_files(job, base_dir, str(args.job))  # bad files fail at once; the keys, in run_job

    from fedtune.launcher import run_job

    return run_job(job, args.output.resolve() if args.output else None, base_dir, samples, source=str(args.job),
                   timeout_s=args.timeout, overwrite=args.overwrite, log_level=args.log_level)


def cmd_scheduler(args: argparse.Namespace) -> int:
    from fedtune import scheduler
    from fedtune.jobstate import JobState

    job = load_job(args.job)
    if not job.spec.redis.address:
        raise SpecError(f"{args.job}: spec.redis.address is not set (the launcher or operator fills it in)")
    state = JobState.connect(job.spec.redis.address, os.environ.get(roles.REDIS_PASSWORD_ENV), job.job_id,
                             wait_s=roles.REDIS_WAIT_S)
    return scheduler.serve(job, state, _listen(args, roles.SCHEDULER, job.spec.scheduler.address), _tls(args))


def cmd_party(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    me = job.spec.party(args.party)
    expected = roles.SUBCOMMANDS[me.role]
    if args.command != expected:
        raise SpecError(f"party `{me.name}` is a {me.role}; run it with `fedtune {expected}`")
    if job.spec.ranks(me) > 1:
        from fedtune import ranks

        if not ranks.launched():  # this process becomes torchrun, which starts the party's ranks
            ranks.check_devices(job.spec, me)
            ranks.relaunch(job.spec.ranks(me), args.argv)
    from fedtune.party import Context, run_party

    base_dir = (args.base_dir or args.job.parent).resolve()
    ctx = Context(job=job, name=me.name, base_dir=base_dir,
                  output_dir=_party_output(job, me.name, args, base_dir), tls=_tls(args),
                  redis_password=os.environ.get(roles.REDIS_PASSWORD_ENV),
                  listen=_listen(args, me.role, me.address))
    return run_party(ctx)


def cmd_chat(args: argparse.Namespace) -> int:
    from fedtune.chat import Chat, Sampling, prompt_template

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_p)
    job = load_job(args.job) if args.job else None
    base_dir = args.job.parent.resolve() if args.job else Path.cwd()
    model = args.model
    if model is None:
        if job is None:
            raise SpecError("--model: the pretrained model folder is needed (or --job, to take the job's)")
        model = resolve_path(job.spec.input.pretrained_model.path, base_dir)
    template = prompt_template(job.spec if job else None, base_dir, args.instruction)
    if args.seed is not None:
        import transformers

        transformers.set_seed(args.seed)
    chat = Chat(model, args.adapter, device=args.device)
    for prompt in args.prompt or _read_prompts(sys.stdin):
        for piece in chat.stream(template(prompt.replace("\\n", "\n")), sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def _read_prompts(stream: IO[str]) -> Iterator[str]:
    """Non-empty lines until the stream ends; on a terminal, with a `> ` before each."""
    interactive = stream.isatty()
    if interactive:
        print("one prompt a line; Ctrl-D ends", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stream.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


def cmd_tiny_model(args: argparse.Namespace) -> int:
    from fedtune.tinymodel import build_tiny_model

    out = build_tiny_model(args.out, args.data, hidden_size=args.hidden_size, num_layers=args.layers, kind=args.kind,
                           pretrain_steps=args.pretrain_steps, vocab_size=args.vocab_size)
    print(out)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from fedtune.chatglm import convert_folder

    _refuse_existing(args.dst)
    print(convert_folder(args.src, args.dst))
    return 0


def cmd_export_adapter(args: argparse.Namespace) -> int:
    from fedtune.chatglm import export_adapter

    _refuse_existing(args.dst)
    print(export_adapter(args.checkpoint, args.dst))
    return 0


def _refuse_existing(dst: Path) -> None:
    if dst.exists():
        raise SpecError(f"{dst}: already exists; choose a new folder")


def cmd_import_xfl(args: argparse.Namespace) -> int:
    from fedtune.xfl import import_xfl

    imported = import_xfl(args.config_dir, name=args.name, base_dir=args.base_dir, local=args.local)
    for note in imported.notes:
        print(f"fedtune import-xfl: {note}", file=sys.stderr)
    text = imported.text
    if args.out is None:
        sys.stdout.write(text)
    else:
        from fedtune.files import write_atomic

        write_atomic(args.out, text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedtune.report import write_report

    for path in write_report(args.output, args.to):
        print(path)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    spec = job.spec
    plans = {}
    if not args.schema_only:
        from fedtune.preflight import check_job

        try:
            plans = check_job(job, (args.base_dir or args.job.parent).resolve(), str(args.job))
        except SpecError as err:
            raise SpecError(f"{err}\n(for files that live elsewhere, e.g. on a cluster: --base-dir or --schema-only)"
                            ) from None
    print(f"{args.job}: job {job.job_id}: {spec.peft.kind}, encryption {spec.encryption.scheme}, "
          f"rounds at {', '.join(f'{f:g}' for f in spec.fractions())} of each party's steps")
    for party in spec.parties:
        where = f"remote at {party.remote.address}" if party.remote else "local"
        if spec.ranks(party) > 1:
            where += f", {spec.ranks(party)} ranks"
        plan = plans.get(party.name)
        steps = f", {plan.samples} samples, {plan.max_steps} steps" if plan and plan.samples else ""
        print(f"  {party.name}: {party.role}, {where}, trainset: "
              f"{', '.join(t.path for t in spec.trainset(party)) or 'none (aggregates only)'}{steps}")
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedtune import certs, files

    if args.certs_command in ("ca", "issue"):
        names = (certs.CA_FILE, "ca.key") if args.certs_command == "ca" else (certs.CERT_FILE, certs.KEY_FILE)
        present = [n for n in names if (args.out / n).exists()]
        if present and not args.force:
            raise SpecError(f"--out {args.out}: {present[0]} exists; pass --force to replace it")
    if args.certs_command == "ca":
        ca = certs.make_ca(args.name)
        files.write_atomic(args.out / certs.CA_FILE, ca.cert_pem)
        files.write_atomic(args.out / "ca.key", ca.key_pem, mode=0o600)
        print(f"wrote {args.out / certs.CA_FILE} (share it) and {args.out / 'ca.key'} (keep it secret)")
    elif args.certs_command == "issue":
        try:
            ca = certs.Issued((args.ca / certs.CA_FILE).read_bytes(), (args.ca / "ca.key").read_bytes())
        except FileNotFoundError as err:
            raise SpecError(f"--ca {args.ca}: missing {Path(err.filename).name}") from None
        issued = certs.issue(ca, args.name, dns_names=args.dns, ips=args.ip)
        certs.write_bundle(args.out, ca.cert_pem, issued)
        print(f"wrote {args.out}/{{ca.crt,tls.crt,tls.key}} for party {args.name}")
    else:
        print(certs.describe(args.cert.read_bytes()))
    return 0


COMMANDS = {
    "run": cmd_run, roles.SUBCOMMANDS[roles.SCHEDULER]: cmd_scheduler,
    roles.SUBCOMMANDS[roles.ASSIST_TRAINER]: cmd_party, roles.SUBCOMMANDS[roles.LABEL_TRAINER]: cmd_party,
    "chat": cmd_chat, "tiny-model": cmd_tiny_model, "import-xfl": cmd_import_xfl, "report": cmd_report,
    "validate": cmd_validate, "certs": cmd_certs, "convert": cmd_convert, "export-adapter": cmd_export_adapter,
}


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
        return COMMANDS[args.command](args)
    except (SpecError, ValueError, FileNotFoundError) as err:
        print(f"fedtune {args.command}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
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


if __name__ == "__main__":
    entry()
