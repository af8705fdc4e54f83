"""HF transformers interop.

- :mod:`condcomp.hf.llama`: in-memory conversion between a dense condcomp model and
  ``LlamaForCausalLM``, and the MoE layer to Mixtral's ``MixtralSparseMoeBlock``;
- :mod:`condcomp.hf.architectures`: the HF architectures a run folder can be read from and
  written as (Llama, Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE), config by config;
- :mod:`condcomp.hf.weights`: their on-disk weight names, the memory-mapped reader of
  ``save_pretrained`` folders and the import's streamed conversion;
- :mod:`condcomp.hf.folders`: ``condcomp import-hf`` / ``export-hf``, run folders to and from
  ``save_pretrained`` folders.

``transformers`` is optional (``pip install 'condcomp[bench]'``): the in-memory conversion
imports it when called; reading and writing folders does not need it.
"""

from condcomp.hf.llama import (
    MissingDependencyError,
    check_llama_compatible,
    from_hf_llama,
    hf_experts_implementations,
    hf_llama_config,
    model_config_from_hf,
    require_transformers,
    to_hf_llama,
    to_hf_mixtral_block,
)

__all__ = ["MissingDependencyError", "check_llama_compatible", "from_hf_llama",
           "hf_experts_implementations", "hf_llama_config", "model_config_from_hf",
           "require_transformers", "to_hf_llama", "to_hf_mixtral_block"]
