"""The RWCNet network, split like RAFT's ``core/``: configuration, encoders, cost volume, update block,
patch processing and the stage-wise model."""

from rwcflow.models.config import PAPER_STAGES, RWCNetConfig, StageConfig
from rwcflow.models.corr import correlation, search_offsets, standardize_costs
from rwcflow.models.extractor import ContextEncoder, Encoder, FeatureEncoder
from rwcflow.models.patches import axis_patches, patch_regions, run_patched
from rwcflow.models.rwcnet import RWCNet, RWCNetOutput, Stage, StageOutput, resize, resize_region, stage_shape
from rwcflow.models.update import ConvGRU, FlowHead, MotionEncoder, UpdateBlock

__all__ = [
    "PAPER_STAGES",
    "ContextEncoder",
    "ConvGRU",
    "Encoder",
    "FeatureEncoder",
    "FlowHead",
    "MotionEncoder",
    "RWCNet",
    "RWCNetConfig",
    "RWCNetOutput",
    "Stage",
    "StageConfig",
    "StageOutput",
    "UpdateBlock",
    "axis_patches",
    "correlation",
    "patch_regions",
    "resize",
    "resize_region",
    "run_patched",
    "search_offsets",
    "stage_shape",
    "standardize_costs",
]
