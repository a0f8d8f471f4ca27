"""The kernels a piece of code would launch on a GPU, counted on CPU: each Triton launch (`kernel[grid](...)`, run by
the interpreter here) and each torch op that computes something, outside those launches. Views, allocations and
dtype queries launch nothing. At batch 1 a decode step is a chain of tiny kernels whose cost is mostly fixed per
launch, so tests use this to pin down how many a call makes. A torch op counts once: kernels a CUDA op launches
below the dispatcher (cuBLAS's split-K reductions; an out-of-place addmm's copy of its input before the GEMM) are
not seen here, so a count is a floor for the torch ops.

    with LaunchCounter(monkeypatch) as counter:
        model(tokens, positions, cache=cache)
    counter.launches    # ["triton:_rms_norm_fwd_kernel", "mm", "triton:_rope_cache_kernel", ...] in launch order
"""

from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import KernelInterface

LAUNCH_FREE = {"empty", "empty_strided", "empty_like", "view", "_unsafe_view", "as_strided", "slice", "select",
               "unsqueeze", "squeeze", "expand", "transpose", "t", "permute", "reshape", "_reshape_alias", "alias",
               "detach", "unflatten", "split", "split_with_sizes", "unbind", "lift_fresh", "promote_types",
               "result_type", "is_same_size", "scalar_tensor"}


class LaunchCounter(TorchDispatchMode):
    def __init__(self, monkeypatch):
        super().__init__()
        self.launches, self.active, self.in_kernel = [], False, False
        real_getitem, counter = KernelInterface.__getitem__, self

        def counted_getitem(kernel, grid):  # kernel[grid] -> a launcher that records itself while the counter is on
            launch = real_getitem(kernel, grid)

            def counted_launch(*args, **kwargs):
                if not counter.active or counter.in_kernel:
                    return launch(*args, **kwargs)
                counter.launches.append(f"triton:{kernel.fn.__name__}")
                counter.in_kernel = True  # the interpreter's own torch ops run no kernel of their own on a GPU
                try:
                    return launch(*args, **kwargs)
                finally:
                    counter.in_kernel = False

            return counted_launch

        monkeypatch.setattr(KernelInterface, "__getitem__", counted_getitem)

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_kernel and name not in LAUNCH_FREE:
            self.launches.append(name)
        return func(*args, **(kwargs or {}))

    def ops(self):
        """The torch ops launched (everything but the Triton kernels)."""
        return [name for name in self.launches if not name.startswith("triton:")]

