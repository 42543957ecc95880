"""sisa: exact machine unlearning with sharded, isolated, sliced and aggregated ensembles."""

from sisa.config import SisaConfig, load_config
from sisa.ensemble import SisaEnsemble
from sisa.errors import *  # noqa: F403
from sisa.ops.delete import DeletionPlan, Receipt

__all__ = ["SisaEnsemble", "SisaConfig", "load_config", "Receipt", "DeletionPlan"]
__version__ = "0.1.0"
