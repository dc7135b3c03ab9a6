"""Tools around jobs: `import-xfl` (the reference's configs), `report` (loss curves of a run),
`certs` (a federation's CA and party certificates)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from pathlib import Path

from fedtune.spec import SpecError


def add_parsers(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
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

    certs = sub.add_parser("certs", help="make and inspect an organisation's CA, party certificates and identities")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    ca = certs_sub.add_parser("ca", help="create an organisation's CA: OUT/ca.crt (share it) and OUT/ca.key (never)")
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
    issue.add_argument("--valid-days", type=float, default=30.0, help="how long the certificate is valid (default 30)")
    show = certs_sub.add_parser("show", help="print a certificate's subject, names, validity and identity")
    show.add_argument("cert", type=Path)
    fingerprint = certs_sub.add_parser("fingerprint", help="print a certificate's identity, sha256:<hex> of its "
                                       "public key: what parties[].identity pins")
    fingerprint.add_argument("cert", type=Path)
    return {"import-xfl": cmd_import_xfl, "report": cmd_report, "certs": cmd_certs}


def cmd_import_xfl(args: argparse.Namespace) -> int:
    from fedtune.tools.xfl import import_xfl

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
    from fedtune.tools.report import write_report

    for path in write_report(args.output, args.to):
        print(path)
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedtune import files
    from fedtune.trust import certs

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
        if args.valid_days <= 0:
            raise SpecError(f"--valid-days {args.valid_days:g}: must be positive")
        issued = certs.issue(ca, args.name, dns_names=args.dns, ips=args.ip, valid=dt.timedelta(days=args.valid_days))
        certs.write_bundle(args.out, ca.cert_pem, issued)
        print(f"wrote {args.out}/{{ca.crt,tls.crt,tls.key}} for party {args.name}\n"
              f"identity: {certs.fingerprint(issued.cert_pem)}")
    else:
        text = _read_cert(args.cert)
        print(certs.describe(text) if args.certs_command == "show" else certs.fingerprint(text))
    return 0


def _read_cert(path: Path) -> bytes:
    from fedtune.trust import certs

    try:
        text = path.read_bytes()
    except OSError as err:
        raise SpecError(f"{path}: cannot read: {err.strerror}") from None
    try:
        certs.fingerprint(text)
    except certs.CertError as err:
        raise SpecError(f"{path}: {err}") from None
    return text
