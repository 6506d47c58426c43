"""Per GPU when a fine-tune runs as several processes (resources.finetune.gpus × nodes; kubetune.distributed).

Each process trains on its share of the global batch (its micro-batch: distributed.split_global_batch), so
activations are the micro-batch's. What the weights, gradients and optimizer states cost per GPU depends on the
parallelism: DDP keeps all of them on every GPU and adds its gradient buckets (a second copy of the trainable
gradients, which it all-reduces); FSDP2 keeps 1/processes of each and gathers one decoder layer's weights at a
time (two while the next one is prefetched).
"""

from __future__ import annotations

from dataclasses import replace


def per_gpu_state(components: list, parallelism: str, processes: int, trainable_grad_bytes: int,
                  layer_weight_bytes: int) -> list:
    """The weights / gradients / optimizer ``components`` (estimate.components.Component) as one GPU holds them."""
    if processes <= 1:
        return components
    component = type(components[0])
    if parallelism == "ddp":
        return [*components, component("DDP gradient buckets", trainable_grad_bytes,
                                        "a copy of the LoRA gradients that DDP all-reduces across the processes")]
    shared = [replace(c, bytes=-(-c.bytes // processes), note=f"1/{processes} of it: FSDP shards it"
                      + (f"; {c.note}" if c.note else "")) for c in components]
    return [*shared, component("FSDP gathered layers", 2 * layer_weight_bytes,
                               "one decoder layer's full weights while it runs, the next one prefetched")]
