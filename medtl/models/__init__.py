"""Pretrained encoders (ImageNet 2D, MedicalNet 3D, inflated 2D->3D) adapted to medtl's tasks.

`create_model` builds a classifier or segmenter with loudly adapted weights and returns a
`ModelBundle` (model, `WeightRecord`, `LoadReport`); `make_transfer_plan` turns a strategy name
into optimizer groups and a per-epoch freezing hook for the training engine. The task and
strategy names are `medtl.vocabulary.TASKS` and `STRATEGIES`.
"""

from medtl.models import medicalnet, timm_encoders  # noqa: F401  (register the encoders)
from medtl.models.adapt import LoadReport, adapt_input_channels, inflate_kernel, load_encoder_weights
from medtl.models.encoder import Encoder
from medtl.models.factory import ModelBundle, check_input_size, create_model
from medtl.models.heads import ClassificationHead, Classifier, Segmenter, UNetDecoder
from medtl.models.inflate import inflate_to_3d
from medtl.models.registry import EncoderSpec, get_encoder_spec, list_encoders, register_encoder
from medtl.models.strategies import TransferPlan, make_transfer_plan
from medtl.models.weights import WeightRecord, find_weight_file, read_checkpoint, weights_dir

__all__ = [
    "ClassificationHead",
    "Classifier",
    "Encoder",
    "EncoderSpec",
    "LoadReport",
    "ModelBundle",
    "Segmenter",
    "TransferPlan",
    "UNetDecoder",
    "WeightRecord",
    "adapt_input_channels",
    "check_input_size",
    "create_model",
    "find_weight_file",
    "get_encoder_spec",
    "inflate_kernel",
    "inflate_to_3d",
    "list_encoders",
    "load_encoder_weights",
    "make_transfer_plan",
    "read_checkpoint",
    "register_encoder",
    "weights_dir",
]
