"""The "flow" evaluator: how well a flow, or the students distilled from it, take images to latents and back.

`predict(batch)` returns a dict (kdforge/distillers/flow_mle.py, flow_kd.py): `input`, the images in the flow's space
([-0.5, 0.5]); any number of `recon_<pairing>` reconstructions of them (`recon_teacher` = the flow's own
decode(encode(x)), `recon_student`, `recon_t_enc_s_dec`, ...); optionally `bits_per_dim` per image. For each pairing:
PSNR and SSIM (torchmetrics, data range 1) and the largest absolute error (the teacher's is its invertibility check,
float rounding only); plus the mean bits/dim. The monitor is the students' PSNR (set `eval.monitor: bits_per_dim`,
`mode: min` when training the flow itself).
"""
from __future__ import annotations

from typing import Any

import torch

from kdforge.metrics.evaluators import Evaluator, _check_not_empty
from kdforge.registry import EVALUATORS


@EVALUATORS.register("flow")
class FlowEvaluator(Evaluator):
    monitor, mode = "psnr_student", "max"

    def __init__(self, data_range: float = 1.0) -> None:
        self.data_range = float(data_range)

    @torch.no_grad()
    def __call__(self, predict, loader, device, *, reference=None, to_batch=None) -> dict[str, Any]:
        from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

        sums: dict[str, float] = {}
        worst: dict[str, float] = {}
        n = 0
        for raw in loader:
            batch = to_batch(raw, device) if to_batch else raw
            out = predict(batch)
            if not isinstance(out, dict) or "input" not in out:
                raise ValueError("flow evaluator: predict must return a dict with 'input' and 'recon_*' images "
                                 "(a flow method's predict: flow_mle, flow_kd)")
            x = out["input"].float()
            b = x.shape[0]
            for key, value in out.items():
                if key.startswith("recon_"):
                    name, y = key[len("recon_"):], value.float()
                    psnr = peak_signal_noise_ratio(y, x, data_range=self.data_range, reduction="none", dim=(1, 2, 3))
                    sums[f"psnr_{name}"] = sums.get(f"psnr_{name}", 0.0) + float(psnr.sum())
                    if min(x.shape[-2:]) >= 11:  # SSIM's Gaussian window
                        s = structural_similarity_index_measure(y, x, data_range=self.data_range, reduction="none")
                        sums[f"ssim_{name}"] = sums.get(f"ssim_{name}", 0.0) + float(s.sum())
                    worst[f"max_err_{name}"] = max(worst.get(f"max_err_{name}", 0.0), float((y - x).abs().max()))
                elif key == "bits_per_dim":
                    sums[key] = sums.get(key, 0.0) + float(value.double().sum())
            n += b
        _check_not_empty(n, "flow")
        return {**{k: v / n for k, v in sums.items()}, **worst}
