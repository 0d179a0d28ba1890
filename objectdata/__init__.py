"""Object data: user folders of multi-view images/masks/cameras/keypoints, and synthetic chairs."""

from .dataset import ObjectViewsDataset, collate
from .folder import scan_objects
from .images import load_mask, load_rgb
from .records import DataError, ObjectRecord, ViewRecord
from .synthetic import default_data_dir, ensure_default_data, generate_chairs

__all__ = [
    "DataError",
    "ObjectRecord",
    "ObjectViewsDataset",
    "ViewRecord",
    "collate",
    "default_data_dir",
    "ensure_default_data",
    "generate_chairs",
    "load_mask",
    "load_rgb",
    "scan_objects",
]
