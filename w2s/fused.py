"""Fused projections for inference: q/k/v as one matmul per block, gate/up as one matmul per block, and the down
projection with the residual add after it as one matmul.

The model keeps Hugging Face's layout: separate q_proj, k_proj, v_proj, gate_proj and up_proj nn.Linear layers, which
is what checkpoints, HF export, LoRA (wraps single layers), FSDP2 (shards single parameters) and tensor parallelism
(w2s/tensor_parallel.py: slices q/k/v by heads, gate/up by units) all address. A small-batch decode step only reads
weights, and five matmuls per block read them worse than two: a GQA model's k/v weights are small enough that one
launch cannot reach full memory bandwidth. So inference builds a fused view at load time instead of changing the
model:

    fuse_projections(model)    # the sampler calls it (default on CUDA); idempotent, cheap when already fused

gives each attention layer one (H*D + 2*K*D, dim) weight and each MLP one (2*F, dim) weight, with the bias likewise,
and then makes every separate layer's weight (and bias) a view of its rows. Nothing is duplicated (memory stays that
of the model), the parameters, their names, the state dict and the checkpoint format are unchanged, and an in-place
change of a separate weight (an optimizer step, load_state_dict) is a change of the fused one. `unfuse_projections`
gives every parameter its own storage again.

`project(module, x, names)` is the one place the model asks for these projections (and `add_projection` for the
MLP's down projection with the residual add: one in-place addmm while the block's MLP is fused). It runs the fused
matmul only while the fused view is still the layers' storage and no weight gradient is wanted; otherwise one matmul
per layer, exactly as before fusion. Anything that replaces a layer or its weight (LoRA injection, FSDP2's
sharding, tensor parallel slicing, model.to(dtype)) moves a weight off the fused storage, which the check sees (the
fused view is then dropped; the sampler fuses again on its next call); so does a forward hook on a separate layer.
`linear(module, name, x)` serves a single plain layer (the attention's o projection) the same way, without fusing.
Each of these matmuls goes through ops.linear / ops.add_linear_: torch's, but for one row without gradients on
Triton (a batch-1 decode step), where a matrix-vector kernel reads the weight at memory bandwidth.

Numerics: one matmul over concatenated weights computes the same dot products as the separate ones, but a BLAS may
block a wider matrix differently, so outputs can differ in the last bits (fp32: ~1e-7 relative); the down
projection's addmm_ rounds residual + product once where the separate add rounds the product first. That is why the
sampler fuses on CUDA only by default: CPU runs stay bit-identical to the unfused model.

    python -m pytest -q tests/test_fused.py     # fused == unfused (logits, greedy tokens), aliasing, invalidation
"""

import torch
import torch.nn as nn

from w2s import ops

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


class _Fused:
    """One module's fused projection: the concatenated weight (sum of outs, in) and bias, the layers it serves and
    the storage address each layer's weight must still have for the fused view to be the layers' weights."""

    def __init__(self, names, layers, weight, bias):
        self.names, self.layers, self.weight, self.bias = names, layers, weight, bias
        self.sizes = tuple(layer.weight.shape[0] for layer in layers)
        self.addresses = tuple((layer.weight.data_ptr(), layer.bias.data_ptr() if bias is not None else None)
                               for layer in layers)

    def wants_grad(self):
        return any(p.requires_grad for layer in self.layers for p in (layer.weight, layer.bias) if p is not None)

    def is_current(self, module):
        """The layers are still module's, unhooked, and their weights (and biases) still views of the fused rows.

        An address check is exact here: the fused tensor keeps its storage alive, so no other tensor can occupy it."""
        for name, layer, (w_ptr, b_ptr) in zip(self.names, self.layers, self.addresses):
            if getattr(module, name) is not layer or _hooked(layer):
                return False
            bias_ptr = None if layer.bias is None else layer.bias.data_ptr()  # a bias set or removed since: stale
            if layer.weight.data_ptr() != w_ptr or bias_ptr != b_ptr:
                return False
        return True


def _hooked(layer):
    """Whether a forward hook watches the layer: the fused matmuls would run without calling it."""
    return bool(layer._forward_hooks or layer._forward_pre_hooks)


def _fusable(layers):
    """Plain nn.Linear layers with plain (not sharded) weights on one real device and dtype, biases all or none."""
    if not all(type(layer) is nn.Linear for layer in layers):
        return False
    params = [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]
    if any(type(p.data) is not torch.Tensor or p.device.type == "meta" for p in params):  # DTensor: FSDP2 / TP
        return False
    if len({(p.device, p.dtype) for p in params}) != 1:
        return False
    return len({layer.bias is None for layer in layers}) == 1


@torch.inference_mode(False)  # called under inference_mode, the parameters would become inference tensors
@torch.no_grad()
def _fuse(module, names):
    fused = module.__dict__.get("_fused")
    if fused is not None and fused.names == names and fused.is_current(module):
        return False
    layers = tuple(getattr(module, name) for name in names)
    module.__dict__.pop("_fused", None)
    if not _fusable(layers):
        return False
    weight = torch.cat([layer.weight for layer in layers])  # (sum of outs, in)
    bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
    start = 0
    for layer in layers:  # each layer's parameters become views of their rows: one storage, no copy kept
        n = layer.weight.shape[0]
        layer.weight.data = weight[start : start + n]
        if bias is not None:
            layer.bias.data = bias[start : start + n]
        start += n
    module.__dict__["_fused"] = _Fused(names, layers, weight, bias)  # a plain attribute: not a parameter or buffer
    return True


def fuse_projections(model):
    """Fuse q/k/v and gate/up of every block of `model` in place (see the module docstring); returns how many
    modules were (re)fused now. Layers that cannot be fused (LoRA, sharded weights) are left as they are."""
    count = 0
    for block in model.layers:
        count += _fuse(block.self_attn, QKV) + _fuse(block.mlp, GATE_UP)
    return count


@torch.inference_mode(False)
@torch.no_grad()
def unfuse_projections(model):
    """Give every fused parameter its own storage again and drop the fused views."""
    for module in model.modules():
        fused = module.__dict__.pop("_fused", None)
        if fused is not None and fused.is_current(module):
            for layer in fused.layers:
                layer.weight.data = layer.weight.data.clone()
                if layer.bias is not None:
                    layer.bias.data = layer.bias.data.clone()


def is_fused(module):
    """Whether `module`'s projections currently run as one fused matmul (when no gradient is wanted)."""
    fused = module.__dict__.get("_fused")
    return fused is not None and fused.is_current(module)


def project(module, x, names):
    """module's linear layers `names` applied to x (..., in) -> a tuple of (..., out_i), one per name: one matmul
    over the fused weight when fuse_projections built it, it is still current and no weight gradient is wanted."""
    fused = module.__dict__.get("_fused")
    if fused is not None and fused.names == names:
        if not fused.is_current(module):
            del module.__dict__["_fused"]  # a stale copy: free it
        elif not (torch.is_grad_enabled() and fused.wants_grad()):
            return ops.linear(x, fused.weight, fused.bias).split(fused.sizes, dim=-1)
    return tuple(getattr(module, name)(x) for name in names)


def _runs_outside(layer, *inputs):
    """Whether layer's projection of `inputs` may run without calling the layer: a plain, unhooked nn.Linear (tensor
    parallelism's all-reduce hook on it must see its output alone, and LoRA's layer is no nn.Linear) of which nothing
    wants a gradient (autograd through the module, as training has always run it)."""
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    return type(layer) is nn.Linear and not _hooked(layer) and not ops.wants_grad(*inputs, *params)


def linear(module, name, x):
    """module.<name>(x), (..., out): where the layer's projection may run outside it (_runs_outside), ops.linear on
    its weight and bias (the same matmul as the layer's but for one row on Triton: the matrix-vector kernel); else the
    layer."""
    layer = getattr(module, name)
    return ops.linear(x, layer.weight, layer.bias) if _runs_outside(layer, x) else layer(x)


def add_projection(residual, module, name, x):
    """residual + module.<name>(x), (..., out). While module's projections are fused for inference (the sampler's
    switch for matmuls that may differ from the separate ones in the last bits) and nothing wants a gradient, one
    matmul that accumulates into the residual stream in place (ops.add_linear_: an addmm_, whose GEMM reads the stream
    as its C and writes the sum over it, or for one row on Triton the matrix-vector kernel adding into it; an
    out-of-place addmm would copy the stream first, one more kernel on CUDA). So the caller must own `residual` and
    not read it again: the block's stream just summed by its norm. The layer must run outside its module
    (_runs_outside) and have no bias. Otherwise the layer and an add, leaving `residual` as it was."""
    layer = getattr(module, name)
    if (is_fused(module) and _runs_outside(layer, residual, x) and layer.bias is None
            and residual.dtype == x.dtype == layer.weight.dtype and residual.is_contiguous()):
        return ops.add_linear_(residual, x, layer.weight)
    return residual + layer(x)
