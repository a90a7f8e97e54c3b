"""Graph: the op rules (``ops/``) and the dependency analysis that groups coupled channels."""
