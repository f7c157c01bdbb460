"""The fused ops are traceable: torch.export sees one graph node per op, and so does a fwd+bwd trace.

Runs in the normal process (VERIFY.md trap (b): under the Triton interpreter fake tensors cannot
trace a triton_op). Tracing uses fake tensors, so no kernel is launched and no GPU is needed.
"""

from __future__ import annotations

import mmcam_kernels
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

MMCAM_OPS = {
    "cam_mask_fwd": torch.ops.mmcam.cam_mask_fwd.default,
    "cam_mask_bwd": torch.ops.mmcam.cam_mask_bwd.default,
    "set_regularizers_fwd": torch.ops.mmcam.set_regularizers_fwd.default,
    "set_regularizers_bwd": torch.ops.mmcam.set_regularizers_bwd.default,
}


class Stage2Head(torch.nn.Module):
    """The part of Stage II that the kernels replace: masking, then the regularizers."""

    def __init__(self, num_classes: int, channels: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(num_classes, channels))

    def forward(self, features, labels, images, f, f_orig):
        masked = mmcam_kernels.cam_mask(features, self.weight, labels, images)
        crr, frr = mmcam_kernels.set_regularizers(f, f_orig, 2)
        return masked, crr + 10.0 * frr


def example_inputs(dtype=torch.float32, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    features = torch.randn(4, 32, 7, 7).to(dtype=dtype, memory_format=fmt)
    images = torch.randn(4, 3, 40, 40).to(dtype=dtype, memory_format=fmt)
    f, f_orig = torch.randn(4, 32).to(dtype), torch.randn(4, 32).to(dtype)
    return features, torch.tensor([0, 0, 1, 1]), images, f, f_orig


def op_counts(graph: torch.fx.Graph) -> dict[str, int]:
    counts = dict.fromkeys(MMCAM_OPS, 0)
    for node in graph.nodes:
        for name, op in MMCAM_OPS.items():
            if node.target is op:
                counts[name] += 1
    return counts


def kernel_nodes(graph: torch.fx.Graph) -> list[str]:
    return [str(node.target) for node in graph.nodes if "triton" in str(node.target)]


@pytest.mark.parametrize(
    "dtype,channels_last",
    [(torch.float32, False), (torch.bfloat16, True)],
    ids=["fp32-contiguous", "bf16-channels_last"],
)
def test_export_gives_one_node_per_op(dtype, channels_last):
    exported = torch.export.export(Stage2Head(3, 32), example_inputs(dtype, channels_last), strict=False)
    graph = exported.graph
    counts = op_counts(graph)
    assert counts["cam_mask_fwd"] == 1 and counts["set_regularizers_fwd"] == 1, f"{counts}\n{graph}"
    # The op is opaque to export: no launched kernels, and none of the unfused steps it replaces.
    assert kernel_nodes(graph) == [], graph
    targets = {str(node.target) for node in graph.nodes}
    assert not targets & {"aten.einsum.default", "aten.upsample_bilinear2d.vec", "aten.amin.default"}, targets


def test_forward_and_backward_trace_to_one_node_each():
    # What torch.compile traces for a Stage II step: the forward ops and their backward ops.
    features, labels, images, f, f_orig = example_inputs()
    weight = torch.randn(3, 32, requires_grad=True)

    def step(weight, features, labels, images, f, f_orig):
        masked = mmcam_kernels.cam_mask(features, weight, labels, images)
        f_masked = f + masked.mean() * f  # f depends on the masked images, as through the backbone
        crr, frr = mmcam_kernels.set_regularizers(f_masked, f_orig, 2)
        return torch.autograd.grad(crr + 10.0 * frr, weight)[0]

    graph = make_fx(step, tracing_mode="fake")(weight, features, labels, images, f, f_orig).graph
    assert op_counts(graph) == dict.fromkeys(MMCAM_OPS, 1), graph
    assert kernel_nodes(graph) == [], graph


def test_torch_compile_traces_forward_and_backward_without_graph_breaks():
    # torch.compile (Dynamo + AOTAutograd, fullgraph) traces into the triton_ops: the compiled
    # forward and backward graphs hold the kernels themselves. Fake tensors: nothing is launched.
    # (Without a GPU driver Triton cannot analyse which arguments a kernel writes, and torch logs a
    # warning and assumes all of them; on a GPU that analysis runs.)
    from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    graphs = {}

    def backend(gm, example_inputs):
        def keep(name):
            def compiler(graph, _inputs):
                graphs[name] = graph
                return make_boxed_func(graph.forward)

            return compiler

        return aot_module_simplified(
            gm, example_inputs, fw_compiler=keep("forward"), bw_compiler=keep("backward")
        )

    def step(weight, features, labels, images, f, f_orig):
        masked = mmcam_kernels.cam_mask(features, weight, labels, images)
        crr, frr = mmcam_kernels.set_regularizers(f + masked.mean() * f, f_orig, 2)
        return crr + 10.0 * frr

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    mode = FakeTensorMode()
    weight = mode.from_tensor(torch.randn(3, 32, requires_grad=True))
    inputs = [mode.from_tensor(t) for t in example_inputs()]
    with mode:
        compiled(weight, *inputs).backward()

    def kernels(graph):
        return [
            kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
            for node in graph.graph.nodes
            if "triton_kernel_wrapper" in str(node.target)
        ]

    assert kernels(graphs["forward"]) == [
        "_cam_mask_fwd_cam_kernel", "_cam_mask_fwd_kernel", "_set_regularizers_fwd_kernel",
    ]  # fmt: skip
    assert sorted(kernels(graphs["backward"])) == sorted([
        "_set_regularizers_bwd_kernel", "_cam_mask_bwd_map_kernel", "_cam_mask_bwd_norm_kernel",
        "_cam_mask_bwd_kernel", "_cam_mask_bwd_reduce_kernel",
    ])  # fmt: skip
