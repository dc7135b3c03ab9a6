"""Commands that run a job: `run` (every role on this machine), `validate`, and one role each
(`scheduler`, `assist-trainer`, `label-trainer`: what a pod or a host of a federation runs)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from fedtune import procctl, roles
from fedtune.exits import EXIT_CODES, RoleError
from fedtune.spec import FederatedFineTune, SpecError, expand_output_path, load_job, resolve_path
from fedtune.spec import terms as job_terms

DEFAULT_ROLE_OUTPUT = "output/[JOB_ID]/[NODE_ID]"  # a role's adapters without --output or spec.output.path


def add_parsers(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    run = sub.add_parser("run", help="run every role of a job on this machine", epilog=EXIT_CODES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("job", type=Path)
    run.add_argument("--output", type=Path, help="adapters land in OUTPUT/<party>/ (default: spec.output.path "
                     "with its [JOB_ID] and [NODE_ID] filled in, else fedtune-output/<party>/)")
    run.add_argument("--base-dir", type=Path, help="folder relative spec paths resolve against")
    run.add_argument("--timeout", type=_seconds, default=24 * 3600,
                     help="stop every role and exit 124 after this many seconds")
    again = run.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in OUTPUT")
    again.add_argument("--resume", action="store_true",
                       help="continue the interrupted or failed run in OUTPUT from its last completed round "
                            "(the same job: refused when its terms changed)")
    run.add_argument("--gpus-per-party", type=int, metavar="N",
                     help="give every local party that trains N GPUs of its own (resources.gpu), one rank each")
    run.add_argument("--ranks-per-party", type=int, metavar="N",
                     help="train every local party that trains with N data-parallel ranks (parties[].ranks; "
                          "gloo ranks on the CPU)")

    for role, what in ((roles.SCHEDULER, "the scheduler role"), (roles.ASSIST_TRAINER, "the assist_trainer "
                       "(aggregator) role"), (roles.LABEL_TRAINER, "a label_trainer role")):
        _role_args(sub.add_parser(roles.SUBCOMMANDS[role], help=f"run {what}"), party=role != roles.SCHEDULER)

    validate = sub.add_parser("validate", help="check a job (schema, model folders, datasets, keys, rounds) "
                              "and print what it will do")
    validate.add_argument("job", type=Path)
    validate.add_argument("--base-dir", type=Path, help="folder relative spec paths resolve against "
                          "(default: the job file's folder)")
    validate.add_argument("--schema-only", action="store_true",
                          help="check only the schema (a job whose files are elsewhere, e.g. on a cluster)")

    return {"run": cmd_run, "validate": cmd_validate, roles.SUBCOMMANDS[roles.SCHEDULER]: cmd_scheduler,
            roles.SUBCOMMANDS[roles.ASSIST_TRAINER]: cmd_party, roles.SUBCOMMANDS[roles.LABEL_TRAINER]: cmd_party}


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
                        help="folder with ca.crt (one or several organisations' CAs), tls.crt, tls.key for "
                        "mutual TLS (default: $FEDTUNE_TLS_DIR); required unless --insecure")
    parser.add_argument("--insecure", action="store_true", help="serve and call without TLS: anyone who reaches "
                        "the ports can join and read; for debugging on one machine only (warns on every start)")


def _party_output(job: FederatedFineTune, party: str, args: argparse.Namespace, base_dir: Path) -> Path:
    if args.output_dir is not None:
        return args.output_dir
    if args.output is not None:
        return args.output / party
    template = job.spec.output.path if job.spec.output is not None else DEFAULT_ROLE_OUTPUT
    return resolve_path(expand_output_path(template, job.job_id, party), base_dir)


def _listen(args: argparse.Namespace, role: str, address: str | None) -> str:
    return args.listen or roles.listen_address(role, address)


def _tls(args: argparse.Namespace, name: str, pin: str | None = None):  # -> transport.TlsMaterial | None
    """This role's TLS material, checked before anything is served (dates, usage, names, its pin, its key);
    without --tls-dir, refused unless --insecure."""
    from fedtune.federation import transport
    from fedtune.trust import certs

    if not args.tls_dir:
        if not args.insecure:
            raise SpecError(f"--tls-dir is not set (nor ${roles.TLS_DIR_ENV}): a role serves and calls only over "
                            "mutual TLS; give it the folder of ca.crt, tls.crt and tls.key (`fedtune certs`), or "
                            "pass --insecure for plaintext on a trusted machine")
        print(f"WARNING: fedtune {args.command} --insecure: plaintext gRPC, no identities checked; anyone who "
              "reaches the ports can join and read every update", file=sys.stderr)
        return None
    names = (certs.CA_FILE, certs.CERT_FILE, certs.KEY_FILE)
    missing = [n for n in names if not (args.tls_dir / n).is_file()]
    if missing:
        raise SpecError(f"--tls-dir {args.tls_dir}: missing {', '.join(missing)}")
    ca, cert, key = ((args.tls_dir / n).read_bytes() for n in names)
    certs.check_own_material(ca, cert, key, name, source=f"--tls-dir {args.tls_dir}", pin=pin)
    return transport.TlsMaterial(ca=ca, cert=cert, key=key)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds: {text!r}")
    return value


def _become(job: FederatedFineTune, role: str, party: str | None = None) -> None:
    """Show job and role in ps; under `fedtune run`, end with the process that started this one."""
    procctl.tie_if_asked()
    rank = os.environ.get("RANK", "0") if "WORLD_SIZE" in os.environ else "0"
    title = procctl.title_of(job.job_id, role, party)
    procctl.set_title(title if rank == "0" else f"{title} rank {rank}")


def cmd_run(args: argparse.Namespace) -> int:
    from fedtune.local.preflight import check_files

    job = load_job(args.job)
    procctl.set_title(procctl.title_of(job.job_id, "run"))
    if args.gpus_per_party is not None or args.ranks_per_party is not None:
        from fedtune.local.launcher import with_party_ranks

        source = f"{args.job} with --gpus-per-party/--ranks-per-party"
        job = with_party_ranks(job, source, gpus=args.gpus_per_party, ranks=args.ranks_per_party)
    base_dir = (args.base_dir or args.job.parent).resolve()
    samples = check_files(job, base_dir, str(args.job))  # bad files fail at once; the keys, in run_job

    from fedtune.local.launcher import run_job

    return run_job(job, args.output.resolve() if args.output else None, base_dir, samples, source=str(args.job),
                   timeout_s=args.timeout, overwrite=args.overwrite, resume=args.resume, log_level=args.log_level)


def cmd_validate(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    spec = job.spec
    plans = {}
    if not args.schema_only:
        from fedtune.local.preflight import check_job

        try:
            plans = check_job(job, (args.base_dir or args.job.parent).resolve(), str(args.job))
        except SpecError as err:
            raise SpecError(f"{err}\n(for files that live elsewhere, e.g. on a cluster: --base-dir or --schema-only)"
                            ) from None
    print(f"{args.job}: job {job.job_id}: {spec.peft.kind}, encryption {spec.encryption.scheme}, "
          f"aggregation {spec.aggregation.strategy.name}, "
          f"rounds at {', '.join(f'{f:g}' for f in spec.fractions())} of each party's steps")
    print(f"  terms {job_terms.digest(job)} (every party's job file must give the same)")
    for party in spec.parties:
        where = f"remote at {party.remote.address}" if party.remote else "local"
        if spec.ranks(party) > 1:
            where += f", {spec.ranks(party)} ranks"
        plan = plans.get(party.name)
        steps = f", {plan.samples} samples, {plan.max_steps} steps" if plan and plan.samples else ""
        print(f"  {party.name}: {party.role}, {where}, trainset: "
              f"{', '.join(t.path for t in spec.trainset(party)) or 'none (aggregates only)'}{steps}")
    if plans:
        from fedtune.local.preflight import device_notes

        for note in device_notes(spec):
            print(f"  note: {note}")
    return 0


def cmd_scheduler(args: argparse.Namespace) -> int:
    from fedtune.federation import scheduler
    from fedtune.federation.jobstate import JobState

    job = load_job(args.job)
    _become(job, roles.SCHEDULER)
    if not job.spec.redis.address:
        raise SpecError(f"{args.job}: spec.redis.address is not set (the launcher or operator fills it in)")
    # bad input first, then the machine's state
    listen, tls = _listen(args, roles.SCHEDULER, job.spec.scheduler.address), _tls(args, roles.SCHEDULER)
    with _machine_errors(job):
        state = JobState.connect(job.spec.redis.address, os.environ.get(roles.REDIS_PASSWORD_ENV), job.job_id,
                                 wait_s=roles.REDIS_WAIT_S)
        return scheduler.serve(job, state, listen, tls)


@contextlib.contextmanager
def _machine_errors(job: FederatedFineTune) -> Iterator[None]:
    """Redis refusing or gone, a port in use: said in one line naming the thing (a RoleError), not a traceback."""
    from redis import RedisError

    from fedtune.federation.transport import TransportError

    try:
        yield
    except RedisError as err:
        raise RoleError(f"Redis at {job.spec.redis.address} (spec.redis.address): {err}") from None
    except TransportError as err:
        raise RoleError(str(err)) from None


def cmd_party(args: argparse.Namespace) -> int:
    job = load_job(args.job)
    me = job.spec.party(args.party)
    expected = roles.SUBCOMMANDS[me.role]
    if args.command != expected:
        raise SpecError(f"party `{me.name}` is a {me.role}; run it with `fedtune {expected}`")
    tls = _tls(args, me.name, me.identity)  # before torchrun: every rank would refuse the same
    _become(job, me.role, me.name)
    if job.spec.ranks(me) > 1:
        from fedtune.train import ranks

        if not ranks.launched():  # this process becomes torchrun, which starts the party's ranks
            ranks.check_devices(job.spec, me)
            ranks.relaunch(job.spec.ranks(me), args.argv)
    from fedtune.federation.party import Context, run_party

    base_dir = (args.base_dir or args.job.parent).resolve()
    ctx = Context(job=job, name=me.name, base_dir=base_dir,
                  output_dir=_party_output(job, me.name, args, base_dir), tls=tls,
                  redis_password=os.environ.get(roles.REDIS_PASSWORD_ENV),
                  listen=_listen(args, me.role, me.address))
    with _machine_errors(job):
        return run_party(ctx)
