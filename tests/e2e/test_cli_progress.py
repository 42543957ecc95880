"""`sisa train` piped (`| tee log`): one line per finished stage with the elapsed time and an ETA, and none of
the libraries' start-up chatter (Ray's token-auth notice, MLflow's table creation) unless `sisa -v`."""

import re
import subprocess
import sys

import pytest
import yaml
from helpers import tiny_config

CHATTER = ("Token authentication is enabled", "Creating initial MLflow database tables")


def sisa(*args):
    out = subprocess.run([sys.executable, "-m", "sisa.cli", *map(str, args)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


@pytest.mark.slow
def test_piped_train_prints_each_stage_and_hides_chatter(tmp_path):
    cfg = tiny_config(
        data={"source": "digits", "test_fraction": 0.2},
        training={"epochs": 1},
        tracking={"enabled": True},
        cluster={"executor": "ray", "num_cpus": 2},
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    err = sisa("train", tmp_path / "c.yaml", "--workdir", tmp_path / "ray").stderr  # stderr is a pipe here
    stages = re.findall(r"shard (\d): stage (\d)/3 done, \d+ rows.*\[(\d)/9 stages, \S+ elapsed(, ETA \S+)?\]", err)
    assert sorted((s, j) for s, j, _, _ in stages) == [(str(s), str(j)) for s in range(3) for j in range(1, 4)], err
    assert [int(n) for _, _, n, _ in stages] == list(range(1, 10))
    assert all(eta for _, _, n, eta in stages if n != "9") and not stages[-1][3]  # an ETA until the last one
    assert not [c for c in CHATTER if c in err], err

    # `sisa -v` shows the libraries' notices (here MLflow creating the new workdir's tables)
    verbose = sisa("-v", "train", tmp_path / "c.yaml", "--workdir", tmp_path / "v", "--executor", "inprocess").stderr
    assert CHATTER[1] in verbose
