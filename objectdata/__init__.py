"""Object data: user folders of multi-view images/masks/cameras/keypoints, and synthetic chairs."""

from .dataset import ObjectViewsDataset, collate
from .folder import scan_objects
from .heatmaps import has_keypoints, keypoint_heatmaps
from .images import load_mask, load_rgb
from .records import DataError, DataWarning, ObjectRecord, ViewRecord
from .sampling import ShuffledBatchSampler, TripletBatchSampler, ignore_stop_signals, partner_weights
from .synthetic import CAMERA_POOL, default_data_dir, ensure_default_data, ensure_generated, generate_chairs

__all__ = [
    "CAMERA_POOL",
    "DataError",
    "DataWarning",
    "ObjectRecord",
    "ObjectViewsDataset",
    "ShuffledBatchSampler",
    "TripletBatchSampler",
    "ViewRecord",
    "collate",
    "default_data_dir",
    "ensure_default_data",
    "generate_chairs",
    "ignore_stop_signals",
    "has_keypoints",
    "keypoint_heatmaps",
    "load_mask",
    "load_rgb",
    "partner_weights",
    "ensure_generated",
    "scan_objects",
]
