"""From a distilled network to a deployable artefact, and the numbers that say whether it is worth deploying.

    export.py     ONNX (torch.export-based exporter, legacy TorchScript exporter as fallback), TorchScript or
                  torch.export's .pt2; every artefact is reloaded and checked against the eager model
    parity.py     flattening outputs and the stated tolerance they must meet
    diagnose.py   ExportError: the operator or module that failed, and the formats that would work
    latency.py    the latency harness: warm-up, pinned threads, repeats, median and spread
    sources.py    run folders, checkpoints and NAME=WEIGHTS teachers as models, with their data and example input
    bench.py      one table row per model: size, MACs, latency (eager, ONNX Runtime, GPU), the evaluator's metric
    quantize.py   int8 post-training quantisation of an ONNX file (onnxruntime.quantization)
    runtime.py    ONNX Runtime sessions on the CPU at a pinned thread count, and an nn.Module around one

The public entry points are `kdforge.export` and `kdforge.bench`. Nothing here imports onnx, onnxscript or
onnxruntime until a function needs them (`pip install 'kdforge[export]'`).
"""
