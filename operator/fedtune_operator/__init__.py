"""The fedtune operator: FederatedFineTune resources become Redis, scheduler and party pods."""
