"""``matcher.onnx``: retrieval, nearest-normal-patch search and the PosFAR residual as one ONNX graph.

Why a graph: an engine that builds plans (TensorRT) can then run the whole frame on the device, the matcher
fused like the backbone and the Swin, with no numpy or CuPy between them.  It computes exactly what
``edge_runtime.core.retrieval.trimmed_distances`` and ``edge_runtime.core.matching.nearest_candidates`` compute
(the trimmed per-cell descriptor distance, the K nearest images, the argmax of the augmented product
[q, 1] . [c, -|c|^2 / 2] over their bank rows, the full-space distance and the residual), and
tests/test_matcher_graph.py holds it to the numpy matcher.

The bank is not inside the graph: its arrays are graph inputs, bound once (device buffers on a GPU), so the
bundle does not carry the bank twice and a field calibration that refits the bank keeps the same graph.  The
shapes that are static per bundle (patches M, d_f, d_l, cells G, channels C, K, rows per image, kept cells) are
baked in; the number of training images is a symbolic dimension.  The row lookup assumes the per-image coreset's
layout (every image the same number of rows, sorted by image): ``matching.matcher_graph_rows`` checks it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.core.matching import MemoryBank, matcher_graph_rows
from edge_runtime.core.retrieval import ReferenceIndex

#: graph inputs that are the bundle's arrays (bound once), in the order the graph declares them
BANK_INPUTS = ("bank_features", "bank_projected_aug", "ref_by_cell", "ref_sq_norms", "pca_mean",
               "pca_components_t")
#: outputs: the residual field (the Swin's input), the distances, the retrieved images and the matched rows
OUTPUTS = ("residual", "distance", "references", "bank_rows")


def build_matcher_graph(*, n_patches: int, d_f: int, d_l: int, cells: int, channels: int, k: int,
                        rows_per_image: int, n_keep: int, thetas: tuple[float, ...], opset: int = 18
                        ) -> onnx.ModelProto:
    """The matcher for one bundle's static shapes (see the module docstring)."""
    if not 1 <= n_keep <= cells:
        raise ValueError(f"kept cells {n_keep} must be in [1, {cells}]")
    r = k * rows_per_image
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    n = "n_images"
    inputs = [
        helper.make_tensor_value_info("pcf", f32, [1, n_patches, d_f]),
        helper.make_tensor_value_info("descriptor", f32, [1, cells, channels]),
        helper.make_tensor_value_info("bank_features", TensorProto.FLOAT16, ["n_bank", d_f]),
        helper.make_tensor_value_info("bank_projected_aug", f32, [n, rows_per_image, d_l + 1]),
        helper.make_tensor_value_info("ref_by_cell", f32, [cells, n, channels]),
        helper.make_tensor_value_info("ref_sq_norms", f32, [n, cells]),
        helper.make_tensor_value_info("pca_mean", f32, [d_f]),
        helper.make_tensor_value_info("pca_components_t", f32, [d_f, d_l]),
    ]
    outputs = [
        helper.make_tensor_value_info("residual", f32, [1, n_patches, d_f]),
        helper.make_tensor_value_info("distance", f32, [1, n_patches]),
        helper.make_tensor_value_info("references", i64, [k]),
        helper.make_tensor_value_info("bank_rows", i64, [n_patches]),
    ]

    def const(name: str, value) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [
        const("shape_gc1", np.array([cells, channels, 1], np.int64)),
        const("shape_gc", np.array([cells, channels], np.int64)),
        const("shape_md", np.array([n_patches, d_f], np.int64)),
        const("shape_rd", np.array([r, d_l + 1], np.int64)),
        const("shape_1m", np.array([1, n_patches], np.int64)),
        const("shape_1md", np.array([1, n_patches, d_f], np.int64)),
        const("axes_1", np.array([1], np.int64)),
        const("axes_2", np.array([2], np.int64)),
        const("n_keep", np.array([n_keep], np.int64)),
        const("k", np.array([k], np.int64)),
        const("rows", np.array(rows_per_image, np.int64)),
        const("two", np.array(2.0, np.float32)),
        const("zero", np.array(0.0, np.float32)),
        const("ones_m1", np.ones((n_patches, 1), np.float32)),
        const("n_thetas", np.array(float(len(thetas)), np.float32)),
    ]
    nodes = [
        # retrieval: per-cell distances to every reference image, the n_keep closest cells summed
        helper.make_node("Reshape", ["descriptor", "shape_gc1"], ["d_col"]),
        helper.make_node("MatMul", ["ref_by_cell", "d_col"], ["dots_gn1"]),  # (G, n, 1)
        helper.make_node("Squeeze", ["dots_gn1", "axes_2"], ["dots_gn"]),
        helper.make_node("Transpose", ["dots_gn"], ["dots"], perm=[1, 0]),  # (n, G)
        helper.make_node("Reshape", ["descriptor", "shape_gc"], ["d_gc"]),
        helper.make_node("Mul", ["d_gc", "d_gc"], ["d_sq_gc"]),
        helper.make_node("ReduceSum", ["d_sq_gc", "axes_1"], ["d_sq"], keepdims=0),  # (G,)
        helper.make_node("Mul", ["dots", "two"], ["dots2"]),
        helper.make_node("Sub", ["ref_sq_norms", "dots2"], ["cell_sq0"]),
        helper.make_node("Add", ["cell_sq0", "d_sq"], ["cell_sq"]),
        helper.make_node("Max", ["cell_sq", "zero"], ["cell_sq_pos"]),
        helper.make_node("Sqrt", ["cell_sq_pos"], ["cell"]),
        helper.make_node("TopK", ["cell", "n_keep"], ["kept", "kept_idx"], axis=1, largest=0, sorted=0),
        helper.make_node("ReduceSum", ["kept", "axes_1"], ["image_dist"], keepdims=0),  # (n,)
        helper.make_node("TopK", ["image_dist", "k"], ["ref_dist", "references"], axis=0, largest=0, sorted=1),
        # matching in PCA space: argmax over the K images' rows of [q, 1] . [c, -|c|^2 / 2]
        helper.make_node("Reshape", ["pcf", "shape_md"], ["p"]),
        helper.make_node("Sub", ["p", "pca_mean"], ["p_centred"]),
        helper.make_node("MatMul", ["p_centred", "pca_components_t"], ["q"]),
        helper.make_node("Concat", ["q", "ones_m1"], ["q_aug"], axis=1),
        helper.make_node("Gather", ["bank_projected_aug", "references"], ["cand3"], axis=0),
        helper.make_node("Reshape", ["cand3", "shape_rd"], ["cand"]),
        helper.make_node("Transpose", ["cand"], ["cand_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["q_aug", "cand_t"], ["scores"]),  # (M, R)
        helper.make_node("ArgMax", ["scores"], ["local"], axis=1, keepdims=0),
        helper.make_node("Div", ["local", "rows"], ["slot"]),  # integer division: which retrieved image
        helper.make_node("Mod", ["local", "rows"], ["within"]),
        helper.make_node("Gather", ["references", "slot"], ["image"], axis=0),
        helper.make_node("Mul", ["image", "rows"], ["image_start"]),
        helper.make_node("Add", ["image_start", "within"], ["bank_rows"]),
        # full-space distance and residual against the matched bank entries
        helper.make_node("Gather", ["bank_features", "bank_rows"], ["matched16"], axis=0),
        helper.make_node("Cast", ["matched16"], ["matched"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["p", "matched"], ["diff_signed"]),
        helper.make_node("Abs", ["diff_signed"], ["diff"]),
        helper.make_node("Mul", ["diff", "diff"], ["diff_sq"]),
        helper.make_node("ReduceSum", ["diff_sq", "axes_1"], ["dist_sq"], keepdims=0),
        helper.make_node("Sqrt", ["dist_sq"], ["dist"]),
        helper.make_node("Reshape", ["dist", "shape_1m"], ["distance"]),
    ]
    powers = []
    for i, theta in enumerate(thetas):
        if float(theta) == 1.0:
            powers.append("diff")
        elif float(theta) == 2.0:
            powers.append("diff_sq")
        else:
            inits.append(const(f"theta_{i}", np.array(float(theta), np.float32)))
            nodes.append(helper.make_node("Pow", ["diff", f"theta_{i}"], [f"pow_{i}"]))
            powers.append(f"pow_{i}")
    nodes.append(helper.make_node("Sum", powers, ["power_sum"]))
    nodes.append(helper.make_node("Div", ["power_sum", "n_thetas"], ["residual_md"]))
    nodes.append(helper.make_node("Reshape", ["residual_md", "shape_1md"], ["residual"]))
    graph = helper.make_graph(nodes, "weakrest_matcher", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="weakrest-train")
    onnx.checker.check_model(model, full_check=True)
    return model


def write_matcher_graph(path: Path, bank: MemoryBank, references: ReferenceIndex, k: int,
                        thetas: tuple[float, ...], n_patches: int) -> Path | None:
    """Write the graph for a fitted bank and reference index; None (nothing written) when the bank does not
    have the per-image layout or holds fewer images than K (the runtime then matches with numpy or CuPy)."""
    rows = matcher_graph_rows(bank.image_index, k)
    if rows is None:
        return None
    g, _, c = references.by_cell.shape
    model = build_matcher_graph(n_patches=n_patches, d_f=int(bank.features.shape[1]), d_l=bank.pca.dim, cells=g,
                                channels=c, k=k, rows_per_image=rows, n_keep=references.n_keep, thetas=thetas)
    onnx.save(model, str(path))
    return path
