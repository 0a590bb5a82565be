"""The spine every stage stands on: config, manifests, store, stage runner, executors, image sources.

Nothing here imports a stage package or an orchestrator.
"""
