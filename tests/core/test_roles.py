"""The launcher↔role contract: the command lines launchers build are what `fedtune` parses, and
the addresses they fill in land where the roles read them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from fedtune import roles
from fedtune.cli import build_parser
from fedtune.spec import parse_job
from support.jobs import EXAMPLE


@pytest.mark.parametrize("role", [roles.SCHEDULER, roles.ASSIST_TRAINER, roles.LABEL_TRAINER])
def test_every_role_command_parses_as_that_role(role: str) -> None:
    party = None if role == roles.SCHEDULER else "node-1"
    argv = roles.role_argv(role, "/etc/job.yaml", party=party, base_dir="/work", output="/out",
                           listen="127.0.0.1:5000", tls_dir="/tls")
    args = build_parser().parse_args(argv)
    assert args.command == roles.SUBCOMMANDS[role]
    assert (args.job, args.base_dir, args.output, args.tls_dir) == tuple(map(Path, ("/etc/job.yaml", "/work",
                                                                                    "/out", "/tls")))
    assert args.listen == "127.0.0.1:5000"
    assert getattr(args, "party", None) == party
    # Optional parts are left out, and the roles fall back to their defaults.
    bare = build_parser().parse_args(roles.role_argv(role, "j.yaml", party=party, base_dir=".", output="o"))
    assert bare.listen is None


def test_listen_address_takes_the_port_of_the_spec_address_or_the_default() -> None:
    assert roles.listen_address(roles.SCHEDULER) == "[::]:55005"
    assert roles.listen_address(roles.ASSIST_TRAINER) == "[::]:55004"
    assert roles.listen_address(roles.ASSIST_TRAINER, "job-assist-trainer:6000") == "[::]:6000"


def test_addresses_land_where_the_roles_read_them() -> None:
    document = yaml.safe_load(EXAMPLE.read_text())
    given = document["spec"]
    original = copy.deepcopy(given)
    assist = next(p["name"] for p in given["parties"] if p["role"] == "assist_trainer")
    document["spec"] = roles.with_addresses(given, scheduler="s:1", redis="r:2",
                                            parties={assist: "a:3", "no-such-party": "x:4"})
    spec = parse_job(document).spec
    assert (spec.scheduler.address, spec.redis.address, spec.assist_trainer.address) == ("s:1", "r:2", "a:3")
    assert all(p.address is None for p in spec.label_trainers)
    assert given == original  # a copy: the mapping given is not changed
    # What is not given stays as it was.
    again = roles.with_addresses(document["spec"], redis="r:9")
    assert again["scheduler"]["address"] == "s:1" and again["redis"]["address"] == "r:9"
