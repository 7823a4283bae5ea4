"""The deployable formats: ONNX (and int8), TorchScript Lite, ExecuTorch."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from imgcls.data import loaders
from imgcls.evaluation.predictor import OnnxModel
from imgcls.networks.folding import fold_batch_norms, has_batch_norms
from imgcls.preprocess import Preprocess


class Deployable(nn.Module):
    """The trained network with its normalisation inside: float [0, 1] RGB in, logits out."""

    def __init__(self, net: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.normalize = loaders.Normalize(preprocess.mean, preprocess.std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def export_onnx(model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> Callable:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    # traced with two images: a batch of one is specialised by torch.export (0/1 specialisation), and
    # networks that look at the batch size (timm's) then fail the dynamic batch
    example = example[:1].expand(2, *example.shape[1:])
    torch.onnx.export(model, (example,), str(out), input_names=["image"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False)
    proto = onnx.load(str(out))
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(out))
    return OnnxModel(out)


def export_executorch(model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str], *,
                      calibration: torch.Tensor | None = None) -> Callable:
    """XNNPACK-delegated .pte; with `calibration`, int8 through the XNNPACK quantiser (PT2E, per-channel)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    if calibration is not None:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(torch.export.export(model, (example,)).module(), quantizer)
        for i in range(len(calibration)):  # the graph has the example's batch size (1)
            prepared(calibration[i:i + 1])
        model = convert_pt2e(prepared)
    program = torch.export.export(model, (example,))
    lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
    out.write_bytes(lowered.buffer)
    Path(str(out) + ".meta.json").write_text(json.dumps(meta, indent=1))
    method = Runtime.get().load_program(str(out)).load_method("forward")
    # the .pte has the example's batch size baked in: run larger batches one image at a time
    return lambda x: torch.cat([method.execute([x[i:i + 1].contiguous()])[0] for i in range(len(x))])


def export_torchscript(model: nn.Module, example: torch.Tensor, out: Path, meta: dict[str, str]) -> Callable:
    from torch.utils.mobile_optimizer import optimize_for_mobile

    traced = torch.jit.trace(model, example)
    try:
        traced = optimize_for_mobile(traced)
    except RuntimeError:  # builds without XNNPACK (e.g. CUDA wheels) cannot run the mobile passes
        print("note: this PyTorch build has no XNNPACK; saving the TorchScript Lite model without mobile "
              "optimisation (its batch norms folded into the convolutions before them all the same)")
        if has_batch_norms(model):  # (VGG11: no copy of its 0.5 GB)
            folded = copy.deepcopy(model)  # (folding changes weights in place: the caller's is the reference)
            # the network alone: fx cannot trace Deployable's normalisation (it looks at the input's dtype)
            if fold_batch_norms(folded.net if isinstance(folded, Deployable) else folded):
                traced = torch.jit.trace(folded, example)
    # written from Python: torch's own writer aborts the process on a full disk
    out.write_bytes(traced._save_to_buffer_for_lite_interpreter(_extra_files={"meta.json": json.dumps(meta)}))
    from torch.jit.mobile import _load_for_lite_interpreter

    lite = _load_for_lite_interpreter(str(out))
    return lambda x: lite(x)


def quantize_onnx(float_path: Path, out: Path, calibration: torch.Tensor) -> Callable:
    """Static int8 (QDQ, per-channel weights), activations calibrated on real training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": calibration[i:i + 8].numpy()} for i in range(0, len(calibration), 8)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    prepared = out.with_suffix(".prep.onnx")
    quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    prepared.unlink(missing_ok=True)
    import onnx

    src, dst = onnx.load(str(float_path)), onnx.load(str(out))
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    onnx.save(dst, str(out))
    return OnnxModel(out)
