"""pre-training.py with a loss spike injected, for the tests: the loss of optimizer step SPIKE_STEP on the process of
rank SPIKE_RANK (default 0) is multiplied by SPIKE_FACTOR before the backward pass, so its gradient spikes with it.

    SPIKE_STEP=16 SPIKE_FACTOR=50 python tests/helpers/spike_injection.py --spec-file specs-tiny.yaml ...
    SPIKE_STEP=16 SPIKE_RANK=1 ... accelerate launch ... tests/helpers/spike_injection.py --spec-file ...

Nothing in the package knows about it: it wraps the loop's loss function and runs pre-training.py as __main__.
"""

import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pretrain.training import loop  # noqa: E402  (after the path is set)

STEP, RANK, FACTOR = int(os.environ["SPIKE_STEP"]), int(os.environ.get("SPIKE_RANK", "0")), \
    float(os.environ["SPIKE_FACTOR"])
original_fit, original_loss = loop.fit, loop.causal_lm_loss
current = {}


def fit(run, *args):
    current["run"] = run
    return original_fit(run, *args)


def spiked_loss(*args, **kwargs):
    loss = original_loss(*args, **kwargs)
    run = current["run"]
    if run.state.step + 1 == STEP and run.accelerator.process_index == RANK:
        return loss * FACTOR
    return loss


loop.fit, loop.causal_lm_loss = fit, spiked_loss
sys.argv = [str(REPO / "pre-training.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
