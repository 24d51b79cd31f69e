"""The constructs the fedstream stack is composed of, one concern each."""
