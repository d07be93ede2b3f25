"""Embedded preprocessing: compile a declared preprocessing spec into the ONNX model.

Training and serving must compute features identically, so the spec is compiled
into ONNX nodes in front of the model and the device feeds raw input. The same spec
runs as a numpy reference for tests, golden vectors and training pipelines.

Typical use::

    pre = ImagePreprocess(resize_shorter=256, center_crop=(224, 224), scale=1 / 255,
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    check_raw_input(pre, raw)                     # clear DataError for bad input
    full = embed_preprocessing(model, pre, Postprocess(softmax=True, top_k=5))
    full = fold_normalization(full)               # before int8 quantization
"""

from .graph import (
    METADATA_LABELS,
    METADATA_POSTPROCESS,
    METADATA_PREPROCESS,
    OUTPUT_LETTERBOX,
    FoldResult,
    embed_preprocessing,
    fold_normalization,
    try_fold_normalization,
)
from .audio import AudioPreprocess, FramesPreprocess
from .reference import (
    apply_reference,
    check_raw_input,
    labels_for,
    letterbox_reference,
    postprocess_reference,
    unletterbox_boxes,
)
from .spec import (
    LUMA_WEIGHTS,
    Column,
    ColumnPlan,
    ImagePreprocess,
    Postprocess,
    Preprocess,
    TabularPreprocess,
    fit_tabular,
    preprocess_from_dict,
)

__all__ = [
    "AudioPreprocess", "FramesPreprocess", "LUMA_WEIGHTS", "METADATA_LABELS", "METADATA_POSTPROCESS", "METADATA_PREPROCESS",
    "OUTPUT_LETTERBOX", "Column", "ColumnPlan", "FoldResult", "ImagePreprocess", "Postprocess", "Preprocess", "TabularPreprocess",
    "apply_reference", "check_raw_input", "embed_preprocessing", "fit_tabular", "fold_normalization",
    "labels_for", "letterbox_reference", "postprocess_reference", "unletterbox_boxes", "preprocess_from_dict", "try_fold_normalization",
]
