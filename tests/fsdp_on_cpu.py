"""Run pre-training.py with accelerate's FSDP on the CPU (gloo), for tests only.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file fsdp_config.yaml tests/fsdp_on_cpu.py --spec-file ...

accelerate (1.15) turns an FSDP launch into FSDP only on GPUs and other accelerators: on the CPU its state falls
back to plain data parallel, although torch's FSDP runs on the CPU with gloo. This shim promotes that state to FSDP
with the plugin accelerate built from the launch config, so the rest of accelerate's FSDP code runs unchanged.
"""

import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

REPO = Path(__file__).resolve().parent.parent
original_init = AcceleratorState.__init__


def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = self.distributed_type


AcceleratorState.__init__ = init_with_fsdp_on_cpu
sys.argv = [str(REPO / "pre-training.py"), *sys.argv[1:]]
sys.path[0] = str(REPO)  # what `python pre-training.py` would have there, so `pretrain` imports
runpy.run_path(sys.argv[0], run_name="__main__")
