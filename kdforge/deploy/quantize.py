"""int8 post-training quantisation of an ONNX file with onnxruntime.quantization: static, QDQ format, weights
int8 per output channel, activations uint8 with ranges calibrated on a few batches of training images (not
test images: the test score of the int8 model must not have seen them)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from kdforge.deploy._optional import require


def quantize_int8(src: str | Path, dst: str | Path, calibration: Iterable[tuple[torch.Tensor, ...]], *,
                  per_channel: bool = True) -> Path:
    """`src` quantised to int8 at `dst`, its activation ranges from the `calibration` batches (a tuple of the
    model's inputs each)."""
    q = require("onnxruntime.quantization", "int8 quantisation")
    session = require("onnxruntime", "int8 quantisation").InferenceSession(str(src), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    batches = [{n: x.detach().cpu().numpy() for n, x in zip(names, inputs)} for inputs in calibration]
    if not batches:
        raise ValueError("int8 quantisation needs at least one calibration batch")

    class Reader(q.CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    src, dst = Path(src), Path(dst)
    pre = dst.with_name(f".{dst.stem}.pre.onnx")
    try:  # shape inference and graph clean-up first, as onnxruntime recommends; optional when it fails
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(str(src), str(pre))
        model_in = pre
    except Exception:
        model_in = src
    try:
        q.quantize_static(str(model_in), str(dst), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=per_channel,
                          activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    finally:
        pre.unlink(missing_ok=True)
    return dst
