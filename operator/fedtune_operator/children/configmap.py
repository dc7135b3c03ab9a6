"""ConfigMap J-job: job.yaml, the spec every role reads, with the in-cluster addresses filled in."""

from __future__ import annotations

from typing import Any

import yaml

from fedtune import roles
from fedtune.roles import ASSIST_TRAINER, REDIS_PORT, SCHEDULER

from ..jobs import API_VERSION, KIND, Job, child_name, hosts_federation, metadata, party_object_name

CONFIG_DIR = "/etc/fedtune"
JOB_KEY = "job.yaml"
JOB_FILE = f"{CONFIG_DIR}/{JOB_KEY}"


def job_document(job: Job) -> dict[str, Any]:
    """The resource as the roles read it: the spec as given, with in-cluster addresses.

    Short Service names: every pod runs in the job's namespace.
    """
    assist = job.spec.assist_trainer
    if hosts_federation(job.spec):
        # A party training alone (no assist_trainer) serves nothing.
        served = {assist.name: f"{party_object_name(job.name, assist)}:{roles.PORTS[ASSIST_TRAINER]}"} if assist else {}
        spec = roles.with_addresses(
            job.document,
            scheduler=f"{child_name(job.name, SCHEDULER)}:{roles.PORTS[SCHEDULER]}",
            redis=f"{child_name(job.name, 'redis')}:{REDIS_PORT}",
            parties=served,
        )
    else:  # spec.scheduler.address is the hosting organisation's, as the user gave it
        spec = roles.with_addresses(job.document, parties={assist.name: assist.remote.address})  # type: ignore[union-attr]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": job.name, "namespace": job.namespace},
        "spec": spec,
    }


def job_configmap(job: Job) -> dict[str, Any]:
    text = yaml.safe_dump(job_document(job), sort_keys=False, allow_unicode=True)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(job, child_name(job.name, "job"), "config"),
        "data": {JOB_KEY: text},
    }
