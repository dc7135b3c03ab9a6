"""Who a party is and whom it trusts: the federation CA, party certificates and signed key-agreement
values (`certs`).

May import: the foundations only (no torch, no gRPC): the operator uses it to make a job's certificates."""
