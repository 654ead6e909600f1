"""swarm-api: an OpenAI-compatible HTTP API and a live page of the swarm, built on libswarm.

It is an app like any other: it talks to the machine's own swarmd over the Unix socket, reads
the daemon's config file for the model and the socket, and its own `api` section. Install the
extra (`pip install './swarm[api]'` from the repository) and run `swarm-api --config /etc/swarmd/swarmd.yaml`."""
