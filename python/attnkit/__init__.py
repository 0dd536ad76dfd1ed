"""attnkit: attention and routing kernels for PyTorch.

Importing this package loads the compiled op library, which registers every op under
``torch.ops.attnkit``; the functions below are thin, documented wrappers with drop-in signatures.
"""
import torch  # noqa: F401  (the op library links against torch's libraries)

from . import _C  # noqa: F401  registers torch.ops.attnkit.*

from .gdpa import GDPA_ACTIVATIONS, gdpa, generalized_dot_product_attention
from .flash import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from .flash_packed import (flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                           flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func)
from .moe import (MoE, expert_load_balance, grouped_gemm, grouped_gemm_swiglu, moe, moe_permute,
                  moe_route, moe_topk_softmax, moe_unpermute, silu_and_mul)
from .moe_ep import moe_combine, moe_dispatch
from . import moe_compat  # vLLM fused_moe drop-ins; its silu_and_mul is vLLM's out-variant
from .moe_compat import (fused_topk, grouped_topk, moe_align_block_size,
                         moe_align_block_size_alloc, moe_sum, topk_sigmoid, topk_softmax)
from .paged import (merge_attn_states, merge_state_v2, pa_fwd, pa_fwd_asm, paged_attention_v1,
                    paged_attention_v2, reshape_and_cache, reshape_and_cache_flash,
                    reshape_and_cache_with_pertoken_quant)

__all__ = [
    "built_with_cuda",
    # GDPA
    "gdpa", "GDPA_ACTIVATIONS", "generalized_dot_product_attention",
    # flash attention
    "flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache",
    "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    # MoE routing
    "moe", "MoE", "moe_route", "moe_topk_softmax", "moe_permute", "moe_unpermute",
    "grouped_gemm", "grouped_gemm_swiglu", "silu_and_mul", "expert_load_balance", "moe_dispatch",
    "moe_combine",
    # vLLM fused_moe drop-ins (attnkit.moe_compat; moe_compat.silu_and_mul is vLLM's (out, x))
    "moe_compat", "topk_softmax", "topk_sigmoid", "fused_topk", "grouped_topk", "moe_sum",
    "moe_align_block_size", "moe_align_block_size_alloc",
    # paged decode attention
    "paged_attention_v1", "paged_attention_v2", "pa_fwd", "pa_fwd_asm", "reshape_and_cache",
    "reshape_and_cache_with_pertoken_quant",
    # serving on NHD caches
    "reshape_and_cache_flash", "merge_attn_states", "merge_state_v2",
]


def built_with_cuda() -> bool:
    """True when the op library was compiled with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("attnkit::gdpa_fwd", "CUDA")
