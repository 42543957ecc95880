"""Data side of sisa: partitioning, the shard/slice store, checkpoints and one shard's sliced training.

Knows nothing of Ray or MLflow. Importing it changes no global state (warning filters, logger levels):
`shards.training.quiet_training` silences Lightning only while a stage trains.
"""
