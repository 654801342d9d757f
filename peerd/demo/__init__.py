"""`peerd demo`: a private swarm on loopback, a generation, a failure, the same output."""
