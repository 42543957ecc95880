"""Data side of sisa: partitioning, the shard/slice store, checkpoints and one shard's sliced training.

Knows nothing of Ray or MLflow.
"""

import warnings

warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
