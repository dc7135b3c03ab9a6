"""A node for the project's local control plane: pods as processes in namespaces (see README.md)."""
