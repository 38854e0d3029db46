"""Accelerate's FSDP on the CPU (gloo), for tests only: on the path of the launched processes through PYTHONPATH.

    PYTHONPATH=tests/fsdp_on_cpu ACCELERATE_USE_CPU=1 accelerate launch --config_file fsdp_config.yaml \
        pre-training.py --spec-file ...

accelerate (1.15) turns an FSDP launch into FSDP only on GPUs and other accelerators: on the CPU its state falls
back to plain data parallel, although torch's FSDP runs on the CPU with gloo. Python imports this file at start-up
(it is `sitecustomize`), and it promotes that state to FSDP with the plugin accelerate built from the launch config,
so pre-training.py and the rest of accelerate's FSDP code run unchanged.
"""

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

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
