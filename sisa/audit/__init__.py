"""Evaluation of deletions, apart from the engine: certificates and their re-check (`certificate`, `report`,
`published` for what MLflow serves), membership-inference attacks (`mia`), the approximate-unlearning
baseline (`approx`) and the `sisa audit` / `sisa publish` commands (`cli`)."""

_LAZY = {"verify": "certificate", "sign_receipt": "report", "AuditReport": "report", "Check": "report"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"sisa.audit.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sisa.audit' has no attribute {name!r}")
