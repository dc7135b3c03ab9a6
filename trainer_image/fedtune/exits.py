"""Exit codes every command and `fedtune run` share (below the command line, so that nothing imports it)."""

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 1, 2, 3, 124, 130
EXIT_CODES = f"""exit codes:
  0    success
  {EXIT_FAILED}    the job failed (a party's error and the tail of its log are printed)
  {EXIT_BAD_INPUT}    bad input: the job file, a dataset, a model folder, a path, a certificate or an option;
       nothing was started and nothing written
  {EXIT_REFUSED}    refused: a party's terms (its own job file) differ from another's, or a peer's identity or
       key bundle does not check out; the party trained nothing and sent nothing
  {EXIT_TIMEOUT}  fedtune run --timeout expired; every role was stopped
  {EXIT_INTERRUPTED}  interrupted"""
