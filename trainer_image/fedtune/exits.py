"""Exit codes every command and `fedtune run` share (below the command line, so that nothing imports it)."""

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 124, 130
EXIT_HANGUP, EXIT_TERMINATED = 129, 143  # 128 + the signal's number, as a shell reports it


class RoleError(OSError):
    """The machine's state stopped a role (Redis gone or refusing, a port in use): its message is the one line
    the command prints before it exits 1."""

EXIT_CODES = f"""exit codes:
  0    success
  {EXIT_FAILED}    the job failed (a party's error and the tail of its log are printed); the machine's
       state stopped it (Redis gone, a full disk, ...)
  {EXIT_BAD_INPUT}    bad input: the job file, a dataset, a model folder, a path, a certificate or an option, an
       output that cannot be written or is in use, a port in use; nothing was started and nothing written
  {EXIT_REFUSED}    refused: a party's terms (its own job file) differ from another's, or a peer's identity or
       key bundle does not check out; the party trained nothing and sent nothing
  {EXIT_TIMEOUT}  fedtune run --timeout expired; every role was stopped
  {EXIT_HANGUP}  fedtune run stopped by SIGHUP: every process it started is stopped; --resume continues
  {EXIT_INTERRUPTED}  interrupted (SIGINT, Ctrl-C); the same
  {EXIT_TERMINATED}  stopped by SIGTERM; the same"""
