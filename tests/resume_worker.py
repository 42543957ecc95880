"""Run in a fresh process by test_determinism: resume one shard from a stage checkpoint to the end."""

import json
import sys

from shards.job import StageRunner
from shards.spec import TrainSpec
from shards.storage import Storage

if __name__ == "__main__":
    args = json.loads(open(sys.argv[1]).read())
    spec = TrainSpec(
        **{
            **args["spec"],
            "epochs_per_stage": tuple(args["spec"]["epochs_per_stage"]),
            "input_shape": tuple(args["spec"]["input_shape"]),
        }
    )
    storage = Storage(args["root"])
    runner = StageRunner()
    prev = args["prev"]
    for stage in range(args["start"], spec.slices + 1):
        prev, _ = runner.run(storage, spec, args["shard"], stage, args["slices"], prev)
    print(json.dumps(prev))
