"""myrq: an RQ app as its users write it, for the compatibility suite (tests/compat/)."""
