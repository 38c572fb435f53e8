"""An import-only stand-in for `sgl_kernel`, written for dynasor's integration tests.

SGLang imports a few names from `sgl_kernel` at start-up when it runs on a CPU, but no
CPU build of that package is on PyPI. Each name below only has to exist: with the flags
the tests launch SGLang with (torch_native attention, no overlap schedule) none is
called. If one ever is, it raises instead of computing something wrong.
"""

from __future__ import annotations


def _missing(name: str):
    def stub(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} was called, but this is dynasor's import-only stand-in "
            "(scripts/sglang_stubs): the server flags must keep SGLang off this kernel"
        )

    stub.__name__ = stub.__qualname__ = name
    return stub


# Imported at module level by sglang.kernels.ops.kvcache.cache_move when the device is a CPU.
copy_all_layer_kv_cache_cpu = _missing("copy_all_layer_kv_cache_cpu")
# Imported at module level by sglang.srt.mem_cache.allocation on a CPU; called only when
# allocating for speculative decoding, which the tests do not enable.
assign_req_to_token_pool_cpu = _missing("assign_req_to_token_pool_cpu")
# Imported at module level on a CPU by the sglang.kernels.ops.speculative modules, which
# the scheduler imports at start-up; called only for speculative decoding (not enabled).
build_tree_kernel_efficient_cpu = _missing("build_tree_kernel_efficient_cpu")
verify_tree_greedy_cpu = _missing("verify_tree_greedy_cpu")
assign_draft_cache_locs_contiguous_cpu = _missing("assign_draft_cache_locs_contiguous_cpu")
assign_extend_cache_locs_cpu = _missing("assign_extend_cache_locs_cpu")
fill_accept_out_cache_loc_cpu = _missing("fill_accept_out_cache_loc_cpu")
fill_bonus_tokens_cpu = _missing("fill_bonus_tokens_cpu")
rotate_input_ids_cpu = _missing("rotate_input_ids_cpu")
