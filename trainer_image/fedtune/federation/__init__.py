"""The federation protocol: the scheduler (`scheduler`), the aggregator (`aggregator`) and how a round's
updates become the global adapter (`strategy`), a training party's flow (`party`), the job's state in
Redis (`jobstate`), gRPC and its mTLS (`transport`, `proto`), and each role's metrics (`metrics`).

May import: `fedtune.train`, `fedtune.model`, `fedtune.secagg`, `fedtune.privacy`, `fedtune.trust`, the
spec and the foundations. The operator imports `jobstate` and `metrics`: they import no torch, and this
package's `__init__` imports nothing."""
