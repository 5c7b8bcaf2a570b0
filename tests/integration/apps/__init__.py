"""Apps used by the integration tests. Their functions are imported by module name in the
containers: strato ships this package (and what it imports) automatically."""
