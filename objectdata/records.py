"""Plain records describing a user's object folders, plus the one error type for bad data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class DataError(ValueError):
    """A problem in a data folder. The message always starts with the offending file or folder."""


class DataWarning(UserWarning):
    """Data that trains, but maybe not as meant (a mask read by a special rule, a view upsampled)."""


def data_error(path: Path | str, problem: str) -> DataError:
    """Build a DataError whose message leads with `path` so users know which file to fix."""
    # Plain single-argument exception (no custom __init__) so it survives pickling,
    # which DataLoader workers do when they forward errors to the main process.
    return DataError(f"{path}: {problem}")


@dataclass
class ViewRecord:
    """One photo of an object, with its optional mask, camera and 2D keypoints."""

    image_path: Path
    mask_path: Path | None = None
    azimuth: float | None = None  # degrees; 0 = looking at the object's front
    elevation: float | None = None  # degrees above the horizon
    distance: float | None = None  # camera-to-object-centre, in the data set's own units
    # Pixel coordinates in the view image, continuous convention: pixel (i, j) covers
    # [i, i+1) x [j, j+1), so its centre is (i + 0.5, j + 0.5). None entries = unknown point.
    keypoints: list[list[float] | None] | None = None
    view_id: str = ""  # file stem, e.g. "000"
    mask_rule: str | None = None  # a non-standard rule the mask was read by (images.MASK_RULES)

    def __post_init__(self) -> None:
        self.image_path = Path(self.image_path)
        if self.mask_path is not None:
            self.mask_path = Path(self.mask_path)
        if not self.view_id:
            self.view_id = self.image_path.stem

    @property
    def has_camera(self) -> bool:
        return None not in (self.azimuth, self.elevation, self.distance)


@dataclass
class ObjectRecord:
    """One object folder: several views of the same physical object."""

    name: str
    root: Path
    category: str
    views: list[ViewRecord]
    # Optional left/right pairing of keypoints: after a horizontal flip, keypoint i takes the
    # mirrored position of keypoint keypoint_flip[i] (e.g. "left foot" <-> "right foot").
    keypoint_flip: list[int] | None = field(default=None)
    # "canonical": azimuth 0 is the same side of every object; "relative": of this object only.
    frame: str = "canonical"

    def __post_init__(self) -> None:
        self.root = Path(self.root)
