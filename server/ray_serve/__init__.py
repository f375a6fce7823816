"""`hotswap serve --ray`: many engine replicas behind one OpenAI endpoint on Ray Serve (docs/scale-out.md).

- `wire.py`: what crosses between ingress and replicas (no Ray);
- `replica.py`: one engine with its own adapter tiers, behind a DeploymentHandle, adapters multiplexed;
- `remote_client.py`: EngineClient's interface over the replicas, for the ingress's HTTP layer;
- `ingress.py`: the FastAPI app of `hotswap serve` built around that client, plus the replica header;
- `board.py`: the replicas' reports (health, metrics, residency) and the admin's pins and deletes;
- `app.py`: deploying it all; `cli.py`: the flags.

Ray is imported only inside functions of these modules, and only with `--ray`.
"""
