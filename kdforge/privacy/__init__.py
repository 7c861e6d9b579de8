"""Reversible face anonymisation with a flow and a secret orthogonal key, and the metrics that judge it: privacy
(re-identification, recovery with right and wrong keys) and fairness over groups (issue 18).

Pure functions over any encoder and decoder callables (the Glow teacher, the CNN students, or a mix), so the same
code scores the teacher, the students and every pairing; `anonymize_folder` / `deanonymize_folder` apply them to a
folder of images with a trained flow run (what `kdforge anonymize` / `kdforge deanonymize` do). OpenCV is imported
only by the Haar face detector.
"""
from kdforge.privacy.anonymize import (
    anonymize,
    deanonymize,
    max_key_distance,
    perturbed_key,
    secret_key,
)
from kdforge.privacy.folder import FlowPairInfo, anonymize_folder, deanonymize_folder, load_flow_pair
from kdforge.privacy.metrics import (
    box_iou,
    face_box_iou,
    group_fairness,
    haar_face_detector,
    largest_face_boxes,
    psnr,
    reidentification_rate,
    ssim,
)

__all__ = ["FlowPairInfo", "anonymize", "anonymize_folder", "box_iou", "deanonymize", "deanonymize_folder",
           "face_box_iou", "group_fairness", "haar_face_detector", "largest_face_boxes", "load_flow_pair",
           "max_key_distance", "perturbed_key", "psnr", "reidentification_rate", "secret_key", "ssim"]
