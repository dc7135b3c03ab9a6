"""A whole job on one machine (`fedtune run`): Redis and certificates in a private temporary folder, every
role a local process forked from one that imported the training stack once (`launcher`, `forkserver`),
and the checks made before anything starts (`preflight`).

May import: `fedtune.federation` and everything below it; never the command line (`fedtune.cli`)."""
