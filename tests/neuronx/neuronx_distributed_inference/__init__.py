"""Stand-in for NxD Inference 0.8 (Neuron SDK 2.28): the host side the `nxdi` engine drives.

Written from aws-neuron/neuronx-distributed-inference @ cd3abf3 ("Neuron SDK Release 2.28.0"),
paths under `src/neuronx_distributed_inference/`. Each rule names the function it mirrors. The
compiled graphs are replaced by the same checkpoint run with transformers on the CPU: every KV
row is recomputed from the tokens NxDI would have written into it, so a call that would corrupt
a row (a live slot left out of a decode batch, a full batch out of `seq_ids` order) gives wrong
logits here as on the device.
"""

__version__ = "0.8.0"  # _version.py at cd3abf3 (published as 0.8.16251)
