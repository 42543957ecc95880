"""`python -m sisa.audit OUT`: the fresh-process retrain of an audit (see `sisa.audit.certificate`)."""

import sys

from sisa.audit.retrain import retrain_worker

retrain_worker(sys.argv[1])
