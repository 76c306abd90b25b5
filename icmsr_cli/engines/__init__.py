"""Many workers on one folder: static shards and claims, and ranks under torchrun or accelerate."""
