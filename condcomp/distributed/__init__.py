"""Running one training job over several processes, launched by ``torchrun``.

- :mod:`.options`: the ``[dist]`` config table;
- :mod:`.context`: the process group, the device meshes and this rank's place in them;
- :mod:`.expert_parallel`: MoE experts sharded over an expert-parallel group, tokens sent to
  them with an autograd-aware all-to-all;
- :mod:`.data_parallel`: FSDP2 or DDP around the model, gradients and their norm;
- :mod:`.checkpoint`: sharded checkpoints (``torch.distributed.checkpoint``) that reshard.
"""
