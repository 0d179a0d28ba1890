"""Camera conventions, written down once: every source camera becomes a camera-to-world matrix with
OpenGL camera axes, then an orbit (azimuth, elevation, distance) in the project's object frame.

The project's frame (objectdata/synthetic.camera_basis): y is up, the object's front faces +z,
azimuth 0 sees the front, positive azimuth moves the camera towards +x, elevation is above the
horizon, and the camera looks at the origin (the object's centre).

Camera axes (columns of a camera-to-world rotation), per convention:
    opengl     x right, y up, looks along -z      Blender, NeRF transforms.json, nerfstudio
    opencv     x right, y down, looks along +z    COLMAP, SRN, Objaverse renders written for OpenCV
    pytorch3d  x left,  y up,   looks along +z    CO3D (row vectors: X_cam = X_world @ R + T)
A source world is named by its up axis and the axis its objects' fronts face ("+y,+z" is the
project's own; Blender's is "+z,-y": its front view looks from -y).
"""
from __future__ import annotations

import math

import numpy as np

# Sign flips taking a convention's camera axes to OpenGL's.
AXIS_FLIPS = {"opengl": np.array([1.0, 1.0, 1.0]), "opencv": np.array([1.0, -1.0, -1.0]),
              "pytorch3d": np.array([-1.0, 1.0, -1.0])}
AXES = {"+x": (1, 0, 0), "-x": (-1, 0, 0), "+y": (0, 1, 0), "-y": (0, -1, 0), "+z": (0, 0, 1), "-z": (0, 0, -1)}


def world_rotation(spec: str) -> np.ndarray:
    """"UP,FRONT" (the source world's up axis and the axis the object's front faces, e.g. Blender's
    "+z,-y") -> rows of the rotation from source world to the project's (x, y up, z front)."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2 or any(p not in AXES for p in parts):
        raise ValueError(f"world axes must be UP,FRONT from {', '.join(AXES)} (e.g. +z,-y), got {spec!r}")
    up, front = (np.array(AXES[p], dtype=np.float64) for p in parts)
    if abs(up @ front) > 0:
        raise ValueError(f"world axes {spec!r}: up and front must be different axes")
    return np.stack([np.cross(up, front), up, front])


class CameraError(ValueError):
    """A camera that cannot be converted; the message names what is wrong, the caller the file."""


def as_matrix(values, kind: str = "c2w") -> np.ndarray:
    """A 4x4 or 3x4 nested list or array -> 4x4 float64; CameraError if it is another shape,
    not finite, or its rotation is not a rotation (a scaled or sheared pose)."""
    matrix = np.asarray(values, dtype=np.float64)
    if matrix.shape not in ((4, 4), (3, 4)):
        raise CameraError(f"a {kind} camera matrix must be 4x4 or 3x4, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise CameraError(f"the {kind} camera matrix has a NaN or infinite entry")
    if matrix.shape == (3, 4):
        matrix = np.vstack([matrix, [0.0, 0.0, 0.0, 1.0]])
    elif not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
        raise CameraError(f"a {kind} camera matrix's last row must be 0 0 0 1, got {matrix[3].tolist()}")
    rotation = matrix[:3, :3]
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=1e-4) or np.linalg.det(rotation) < 0:
        raise CameraError(f"the {kind} camera matrix's 3x3 part is not a rotation (det {np.linalg.det(rotation):.3g})")
    return matrix


def opengl_c2w(matrix, axes: str, kind: str) -> np.ndarray:
    """A source camera (kind "c2w" or "w2c", camera axes `axes`) -> 4x4 c2w with OpenGL axes."""
    pose = as_matrix(matrix, kind)
    if kind == "w2c":
        pose = np.linalg.inv(pose)
    elif kind != "c2w":
        raise ValueError(f"kind must be c2w or w2c, got {kind!r}")
    pose = pose.copy()
    pose[:3, :3] = pose[:3, :3] * AXIS_FLIPS[axes][None, :]
    return pose


def pytorch3d_c2w(R, T) -> np.ndarray:
    """PyTorch3D's R [3,3], T [3] (X_cam = X_world @ R + T) -> 4x4 c2w with OpenGL axes."""
    w2c = np.eye(4)
    w2c[:3, :3], w2c[:3, 3] = np.asarray(R, dtype=np.float64).T, np.asarray(T, dtype=np.float64)
    return opengl_c2w(w2c, "pytorch3d", "w2c")


def nearest_point_to_axes(c2ws: np.ndarray) -> np.ndarray:
    """c2ws [N,4,4] (OpenGL) -> [3] the point closest, in least squares, to every optical axis:
    where the cameras look, i.e. the object's centre in a capture that circles it."""
    eye = np.eye(3)
    lhs, rhs = np.zeros((3, 3)), np.zeros(3)
    for pose in c2ws:
        direction = -pose[:3, 2] / np.linalg.norm(pose[:3, 2])
        projector = eye - np.outer(direction, direction)
        lhs += projector
        rhs += projector @ pose[:3, 3]
    return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


def estimate_up(c2ws: np.ndarray) -> np.ndarray:
    """c2ws [N,4,4] (OpenGL) -> the world's up [3]. A camera held level has a horizontal right
    axis, so up is the direction most perpendicular to every camera's right (exact for level
    cameras at any elevations), signed like their mean up; the mean up alone when the rights
    cannot tell (all cameras facing one way)."""
    rights = c2ws[:, :3, 0] / np.linalg.norm(c2ws[:, :3, 0], axis=1, keepdims=True)
    mean_up = c2ws[:, :3, 1].mean(axis=0)
    values, vectors = np.linalg.eigh(rights.T @ rights)           # ascending eigenvalues
    if values[1] - values[0] < 1e-6 * max(values[2], 1e-12):
        return mean_up / np.linalg.norm(mean_up)
    up = vectors[:, 0]
    return up if up @ mean_up >= 0 else -up


def relative_frame(c2ws: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """For a capture with no common front (CO3D, COLMAP): rows of a rotation into a frame whose y is
    the world's up (estimate_up) and whose +z points at the first camera, so that view is azimuth 0."""
    up = estimate_up(c2ws)
    towards = c2ws[0, :3, 3] - centre
    front = towards - up * (towards @ up)
    if np.linalg.norm(front) < 1e-9:          # the first camera is straight above: use its up
        front = c2ws[0, :3, 1] - up * (c2ws[0, :3, 1] @ up)
    front /= np.linalg.norm(front)
    return np.stack([np.cross(up, front), up, front])


def to_project(c2w: np.ndarray, rotation: np.ndarray, centre: np.ndarray, scale: float) -> np.ndarray:
    """An OpenGL c2w in source world -> the same camera in the project's frame (centred, scaled)."""
    out = np.eye(4)
    out[:3, :3] = rotation @ c2w[:3, :3]
    out[:3, 3] = scale * (rotation @ (c2w[:3, 3] - centre))
    return out


def orbit(c2w: np.ndarray) -> dict:
    """An OpenGL c2w in the project's frame -> azimuth, elevation (degrees), distance, and what
    an orbit cannot say: roll (degrees the image is turned about the optical axis) and off_axis
    (degrees between the optical axis and the direction to the object's centre)."""
    position = c2w[:3, 3]
    distance = float(np.linalg.norm(position))
    if distance < 1e-9:
        raise CameraError("the camera sits at the object's centre")
    azimuth = math.degrees(math.atan2(position[0], position[2]))
    elevation = math.degrees(math.asin(max(-1.0, min(1.0, position[1] / distance))))
    forward = -c2w[:3, 2]
    to_centre = -position / distance
    off_axis = math.degrees(math.acos(max(-1.0, min(1.0, float(forward @ to_centre) / np.linalg.norm(forward)))))
    # Roll: the camera's right axis against the horizontal right of a camera at this spot.
    level_right = np.cross(to_centre, [0.0, 1.0, 0.0])
    if np.linalg.norm(level_right) < 1e-9:      # straight above or below: roll is undefined
        roll = 0.0
    else:
        level_right /= np.linalg.norm(level_right)
        right = c2w[:3, 0] / np.linalg.norm(c2w[:3, 0])
        level_up = np.cross(level_right, to_centre)
        roll = math.degrees(math.atan2(float(right @ level_up), float(right @ level_right)))
    return {"azimuth": azimuth, "elevation": elevation, "distance": distance, "roll": roll, "off_axis": off_axis}


def orbit_c2w(azimuth: float, elevation: float, distance: float, roll: float = 0.0) -> np.ndarray:
    """The inverse of `orbit` for a camera looking at the centre: an OpenGL c2w in the project's
    frame (the pose objectdata/synthetic.camera_basis renders from, turned by `roll`)."""
    az, el = math.radians(azimuth), math.radians(elevation)
    position = distance * np.array([math.sin(az) * math.cos(el), math.sin(el), math.cos(az) * math.cos(el)])
    forward = -position / distance
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    r = math.radians(roll)
    right, up = math.cos(r) * right + math.sin(r) * up, -math.sin(r) * right + math.cos(r) * up
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, up, -forward, position
    return c2w
