"""Routing state: instance records in Redis (`store`), instance choice (`policy`), and a
private Redis server for single-node deployments (`redis_server`). Torch-free."""
