"""`ssn-edge demo`: the whole pipeline on a procedural data set."""
