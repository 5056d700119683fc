"""vpd_shapes: procedurally rendered indoor scenes with exact labels, metric depth and referring text.

Pure numpy (no TF), deterministic for a given seed, callable directly (`render_scene`) or through the TFDS
builder `vpd_jax.data.builders.vpd_shapes`. It is the default dataset of the demo and of the end-to-end tests
for all four tasks, so every label is exact: each pixel is one ray through its centre, intersected analytically
with the scene (no anti-aliasing), and the semantic label, instance id and depth all come from that one hit.

Geometry (camera coordinates: x right, y up, z forward; depth is z, as in NYUv2):
  * pinhole camera at the origin, optical axis horizontal, focal `f` pixels, principal point (cx, cy) with
    cy above the image centre (a shifted lens) so the floor fills most of the image;
  * floor plane y = -camera_height, back wall plane z = wall_distance;
  * pixel (row i, column j) has centre (u, v) = (j + 0.5, i + 0.5) and ray direction
    ((u - cx) / f, -(v - cy) / f, 1), so the ray parameter t is the depth;
  * floor depth at row v (below the horizon) is f * camera_height / (v - cy), the wall's is wall_distance;
  * objects (sphere, cube, cylinder, cone) stand on the floor in front of the wall, lower than the camera.
The scene type (a few NYU scene names) sets the room size, camera height and the wall/floor colours, so the
depth task's text input carries information about the depth scale.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from vpd_jax.data.class_names import VPD_SHAPES_CLASSES as SEMANTIC_CLASSES
from vpd_jax.data.class_names import nyu_scene_class_id

# Raw semantic ids, ADE-style: 0 is "other" (never drawn; reduce_zero_label maps it to ignore), 1.. are classes.
WALL, FLOOR = 1, 2
SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "green": (40, 170, 50),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 25),
    "purple": (140, 45, 180),
}
MAX_OBJECTS = 8  # object ids are image_id * MAX_OBJECTS + index
MAX_SENTENCES = 4  # sentence ids are object id * MAX_SENTENCES + index


@dataclasses.dataclass(frozen=True)
class RoomStyle:
    """One scene type: its name (an NYU scene class) fixes the room geometry ranges and colours."""
    name: str
    wall_rgb: tuple[int, int, int]
    floor_rgb: tuple[tuple[int, int, int], tuple[int, int, int]]  # checkerboard tiles
    tile_m: float
    camera_height_m: tuple[float, float]
    wall_distance_m: tuple[float, float]


ROOMS: tuple[RoomStyle, ...] = (
    RoomStyle("bathroom", (200, 214, 222), ((228, 228, 228), (165, 172, 178)), 0.25, (0.9, 1.1), (3.2, 3.8)),
    RoomStyle("bedroom", (216, 202, 180), ((150, 112, 82), (122, 88, 62)), 0.6, (1.0, 1.25), (3.8, 4.6)),
    RoomStyle("kitchen", (234, 230, 206), ((192, 162, 122), (112, 92, 72)), 0.4, (1.1, 1.35), (4.4, 5.4)),
    RoomStyle("office", (186, 189, 194), ((96, 101, 112), (76, 81, 90)), 0.5, (1.2, 1.45), (5.2, 6.6)),
)

_LIGHT = np.array([-0.35, 0.85, -0.4]) / np.linalg.norm([-0.35, 0.85, -0.4])
_AMBIENT, _DIFFUSE = 0.45, 0.55


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    """Image size and scene statistics. Field defaults give 96x128 images with 2-4 objects."""
    height: int = 96
    width: int = 128
    horizontal_fov_deg: float = 60.0
    principal_row_fraction: float = 0.05  # cy = round(fraction * height)
    min_objects: int = 2
    max_objects: int = 4
    duplicate_probability: float = 0.25  # chance that a second object repeats the first's colour and shape
    min_visible_fraction: float = 0.004  # of the image, per object (and at least 25 pixels)


@dataclasses.dataclass(frozen=True)
class Camera:
    focal: float
    cx: float
    cy: float
    height_m: float
    wall_distance_m: float

    def floor_depth(self, row_centre: np.ndarray) -> np.ndarray:
        """Depth of the floor seen through pixel rows with centre `row_centre` (valid below the horizon)."""
        return self.focal * self.height_m / (row_centre - self.cy)


@dataclasses.dataclass(frozen=True)
class SceneObject:
    id: int
    shape: str
    colour: str
    position_m: tuple[float, float]  # (x, z) of the footprint centre on the floor
    size_m: float  # radius (sphere, cylinder, cone base) or half edge (cube)
    height_m: float  # vertical extent
    yaw: float  # cubes only
    sentences: tuple[str, ...] = ()

    @property
    def semantic_id(self) -> int:
        return SEMANTIC_CLASSES.index(self.shape)

    @property
    def footprint_radius_m(self) -> float:
        return self.size_m * (math.sqrt(2.0) if self.shape == "cube" else 1.0)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One rendered image with everything the four tasks need."""
    image: np.ndarray  # (H, W, 3) uint8
    label: np.ndarray  # (H, W) uint8, raw ids into SEMANTIC_CLASSES
    depth: np.ndarray  # (H, W) float32 metres (z)
    instance: np.ndarray  # (H, W) int16: object index, -1 for wall/floor
    objects: tuple[SceneObject, ...]
    phrases: tuple[tuple[str, np.ndarray], ...]  # (phrase, (H, W) bool union mask)
    room: str
    camera: Camera

    @property
    def scene_class(self) -> int:
        return nyu_scene_class_id(self.room)


SPLITS: tuple[str, ...] = ("train", "validation")


def iter_scenes(seed: int, split: str, count: int, config: ShapesConfig = ShapesConfig()):
    """(image_id, Scene) for the `count` scenes of `split`; scene i depends only on (seed, split, i)."""
    if split not in SPLITS:
        raise ValueError(f"vpd_shapes has splits {SPLITS}, not {split!r}")
    split_code = SPLITS.index(split)
    for image_id in range(count):
        yield image_id, render_scene((seed, split_code, image_id), config, image_id)


def render_scene(seed: Sequence[int] | int, config: ShapesConfig = ShapesConfig(), image_id: int = 0) -> Scene:
    """Renders the scene determined by `seed` (anything `np.random.default_rng` accepts).

    Objects are re-drawn until each one is visible enough and same-looking objects are clearly left/right of
    each other, so every referring expression is true and names exactly one object.
    """
    rng = np.random.default_rng(seed)
    room = ROOMS[rng.integers(len(ROOMS))]
    focal = (config.width / 2) / math.tan(math.radians(config.horizontal_fov_deg) / 2)
    camera = Camera(
        focal=focal,
        cx=config.width / 2,
        cy=float(round(config.principal_row_fraction * config.height)),  # integer, never a pixel centre
        height_m=float(rng.uniform(*room.camera_height_m)),
        wall_distance_m=float(rng.uniform(*room.wall_distance_m)),
    )
    rays = _rays(config.height, config.width, camera)
    min_pixels = max(25, int(config.min_visible_fraction * config.height * config.width))
    for _ in range(100):
        objects = _place_objects(rng, config, camera)
        if objects is None:
            continue
        depth, surface, normal = _trace(rays, camera, objects)
        instance = (surface - 2).astype(np.int16)  # surfaces: 0 wall, 1 floor, 2.. objects
        instance[instance < 0] = -1
        if _layout_is_unambiguous(objects, instance, min_pixels):
            break
    else:  # pragma: no cover - the constraints are loose; this would be a bug in the ranges above
        raise RuntimeError(f"vpd_shapes: no valid layout found for seed {seed!r}")
    objects = _with_sentences(objects, instance, image_id)
    label = np.where(surface == 0, WALL, FLOOR).astype(np.uint8)
    for k, obj in enumerate(objects):
        label[instance == k] = obj.semantic_id
    image = _shade(rays, depth, surface, normal, objects, room)
    return Scene(
        image=image, label=label, depth=depth.astype(np.float32), instance=instance, objects=objects,
        phrases=_phrases(objects, instance, label), room=room.name, camera=camera,
    )


def _rays(height: int, width: int, camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel ray direction (dx, dy); dz is 1, so the ray parameter is the depth."""
    u = np.arange(width, dtype=np.float64) + 0.5
    v = np.arange(height, dtype=np.float64) + 0.5
    dx = np.broadcast_to(((u - camera.cx) / camera.focal)[None, :], (height, width))
    dy = np.broadcast_to((-(v - camera.cy) / camera.focal)[:, None], (height, width))
    return dx, dy


def _place_objects(rng: np.random.Generator, config: ShapesConfig, camera: Camera) -> list[SceneObject] | None:
    """Non-overlapping objects on the visible floor, or None when they did not fit (the caller redraws)."""
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    # Nearest floor distance visible at the bottom row, so objects stand mostly inside the frame.
    z_near = float(camera.floor_depth(np.float64(config.height - 0.5)))
    objects: list[SceneObject] = []
    for _ in range(50 * count):
        if len(objects) == count:
            return objects
        if objects and len(objects) == 1 and rng.uniform() < config.duplicate_probability:
            shape, colour = objects[0].shape, objects[0].colour
        else:
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
        size, height = _draw_size(rng, shape)
        footprint = size * (math.sqrt(2.0) if shape == "cube" else 1.0)
        z_far = camera.wall_distance_m - footprint - 0.3
        z = rng.uniform(min(z_near + footprint, z_far - 0.2), z_far)
        x_max = z * camera.cx / camera.focal - footprint
        x = rng.uniform(-x_max, x_max)
        candidate = SceneObject(
            id=len(objects), shape=shape, colour=colour, position_m=(float(x), float(z)), size_m=size,
            height_m=height, yaw=float(rng.uniform(0, math.pi / 2)),
        )
        if all(_floor_distance(candidate, o) > candidate.footprint_radius_m + o.footprint_radius_m + 0.05
               for o in objects):
            objects.append(candidate)
    return objects if len(objects) == count else None


def _draw_size(rng: np.random.Generator, shape: str) -> tuple[float, float]:
    if shape == "sphere":
        radius = float(rng.uniform(0.22, 0.4))
        return radius, 2 * radius
    if shape == "cube":
        half = float(rng.uniform(0.18, 0.34))
        return half, 2 * half
    if shape == "cylinder":
        return float(rng.uniform(0.18, 0.32)), float(rng.uniform(0.45, 1.0))
    return float(rng.uniform(0.22, 0.38)), float(rng.uniform(0.5, 1.05))  # cone


def _floor_distance(a: SceneObject, b: SceneObject) -> float:
    return math.dist(a.position_m, b.position_m)


def _trace(rays, camera: Camera, objects: Sequence[SceneObject]):
    """Nearest hit per pixel: depth, surface index (0 wall, 1 floor, 2+k object k) and unit normal."""
    dx, dy = rays
    shape = dx.shape
    wall_t = np.full(shape, camera.wall_distance_m)
    with np.errstate(divide="ignore"):
        floor_t = np.where(dy < 0, -camera.height_m / dy, np.inf)
    hits = [(wall_t, _const_normal(shape, (0.0, 0.0, -1.0))), (floor_t, _const_normal(shape, (0.0, 1.0, 0.0)))]
    floor_y = -camera.height_m
    for obj in objects:
        hits.append(_INTERSECT[obj.shape](dx, dy, obj, floor_y))
    depths = np.stack([t for t, _ in hits])
    surface = np.argmin(depths, axis=0)  # ties go to the earlier surface (floor before an object's base)
    depth = np.take_along_axis(depths, surface[None], axis=0)[0]
    normals = np.stack([n for _, n in hits])
    normal = np.take_along_axis(normals, surface[None, ..., None], axis=0)[0]
    return depth, surface, normal


def _const_normal(shape, n) -> np.ndarray:
    return np.broadcast_to(np.asarray(n, dtype=np.float64), (*shape, 3))


def _points(t, dx, dy):
    return t * dx, t * dy, t


def _unit(x, y, z) -> np.ndarray:
    n = np.stack([x, y, z], axis=-1)
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)


def _sphere(dx, dy, obj: SceneObject, floor_y: float):
    (cx, cz), r = obj.position_m, obj.size_m
    cy = floor_y + r
    a = dx * dx + dy * dy + 1.0
    b = -2.0 * (dx * cx + dy * cy + cz)
    c = cx * cx + cy * cy + cz * cz - r * r
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    t = np.where((disc >= 0) & (t > 0), t, np.inf)
    x, y, z = _points(np.where(np.isfinite(t), t, 0.0), dx, dy)
    return t, _unit(x - cx, y - cy, z - cz)


def _cylinder(dx, dy, obj: SceneObject, floor_y: float):
    (cx, cz), r, top = obj.position_m, obj.size_m, floor_y + obj.height_m
    a = dx * dx + 1.0
    b = -2.0 * (dx * cx + cz)
    c = cx * cx + cz * cz - r * r
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t_side = (-b - np.sqrt(disc)) / (2 * a)
    y_side = t_side * dy
    t_side = np.where((disc >= 0) & (t_side > 0) & (y_side >= floor_y) & (y_side <= top), t_side, np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_cap = np.where(dy < 0, top / dy, np.inf)
    on_cap = (t_cap * dx - cx) ** 2 + (t_cap - cz) ** 2 <= r * r
    t_cap = np.where(on_cap & (t_cap > 0), t_cap, np.inf)
    t = np.minimum(t_side, t_cap)
    x, _, z = _points(np.where(np.isfinite(t), t, 0.0), dx, dy)
    side_normal = _unit(x - cx, np.zeros_like(x), z - cz)
    return t, np.where((t_cap < t_side)[..., None], np.array([0.0, 1.0, 0.0]), side_normal)


def _cone(dx, dy, obj: SceneObject, floor_y: float):
    (cx, cz), r = obj.position_m, obj.size_m
    apex = floor_y + obj.height_m
    k2 = (r / obj.height_m) ** 2
    # (t dx - cx)^2 + (t - cz)^2 = k^2 (apex - t dy)^2
    a = dx * dx + 1.0 - k2 * dy * dy
    b = -2.0 * (dx * cx + cz) + 2.0 * k2 * apex * dy
    c = cx * cx + cz * cz - k2 * apex * apex
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt(disc)
        roots = [(-b - root) / (2 * a), (-b + root) / (2 * a)]
    t = np.full(dx.shape, np.inf)
    for candidate in roots:  # the nearer valid root on the finite cone (between the floor and the apex)
        y = candidate * dy
        ok = (disc >= 0) & (candidate > 0) & (y >= floor_y) & (y <= apex)
        t = np.where(ok & (candidate < t), candidate, t)
    x, y, z = _points(np.where(np.isfinite(t), t, 0.0), dx, dy)
    return t, _unit(x - cx, k2 * (apex - y), z - cz)


def _cube(dx, dy, obj: SceneObject, floor_y: float):
    (cx, cz), s = obj.position_m, obj.size_m
    centre = np.array([cx, floor_y + s, cz])
    cos, sin = math.cos(obj.yaw), math.sin(obj.yaw)
    rot = np.array([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]])  # local -> camera
    origin = rot.T @ (-centre)
    direction = np.stack([dx, dy, np.ones_like(dx)], axis=-1) @ rot  # rows: rot.T @ d
    t_near = np.full(dx.shape, -np.inf)
    t_far = np.full(dx.shape, np.inf)
    face = np.zeros(dx.shape, dtype=np.int64)
    face_sign = np.zeros(dx.shape)
    for axis in range(3):
        d = direction[..., axis]
        o = origin[axis]
        parallel = d == 0
        safe_d = np.where(parallel, 1.0, d)
        t1, t2 = (-s - o) / safe_d, (s - o) / safe_d
        lo = np.where(parallel, np.where(abs(o) <= s, -np.inf, np.inf), np.minimum(t1, t2))
        hi = np.where(parallel, np.where(abs(o) <= s, np.inf, -np.inf), np.maximum(t1, t2))
        entering = lo > t_near
        face = np.where(entering, axis, face)
        face_sign = np.where(entering, -np.sign(safe_d), face_sign)
        t_near = np.maximum(t_near, lo)
        t_far = np.minimum(t_far, hi)
    t = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
    local_normal = np.eye(3)[face] * face_sign[..., None]
    return t, local_normal @ rot.T


_INTERSECT = {"sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone}


def _centroid_column(instance: np.ndarray, k: int) -> float:
    return float(np.nonzero(instance == k)[1].mean())


def _layout_is_unambiguous(objects, instance, min_pixels: int) -> bool:
    counts = np.bincount(instance[instance >= 0].ravel(), minlength=len(objects))
    if counts.min() < min_pixels:
        return False
    width = instance.shape[1]
    for group in _groups(objects, lambda o: (o.shape, o.colour)).values():
        if len(group) > 2:
            return False
        if len(group) == 2:
            a, b = (_centroid_column(instance, o.id) for o in group)
            if abs(a - b) < 0.1 * width:
                return False
    return True


def _groups(objects, key) -> dict:
    groups: dict = {}
    for obj in objects:
        groups.setdefault(key(obj), []).append(obj)
    return groups


def _with_sentences(objects, instance, image_id: int) -> tuple[SceneObject, ...]:
    """Referring expressions, each naming exactly one object (by colour/shape uniqueness or left/right)."""
    by_look = _groups(objects, lambda o: (o.shape, o.colour))
    by_shape = _groups(objects, lambda o: o.shape)
    by_colour = _groups(objects, lambda o: o.colour)
    result = []
    for obj in objects:
        look = by_look[(obj.shape, obj.colour)]
        name = f"{obj.colour} {obj.shape}"
        if len(look) == 1:
            sentences = [f"the {name}"]
            if len(by_shape[obj.shape]) == 1:
                sentences.append(f"the {obj.shape}")
            if len(by_colour[obj.colour]) == 1:
                sentences.append(f"the {obj.colour} object")
        else:
            other = look[1] if look[0] is obj else look[0]
            left = _centroid_column(instance, obj.id) < _centroid_column(instance, other.id)
            side = "left" if left else "right"
            sentences = [f"the {name} on the {side}", f"the {side} {name}"]
        result.append(dataclasses.replace(obj, id=image_id * MAX_OBJECTS + obj.id, sentences=tuple(sentences)))
    return tuple(result)


def _phrases(objects, instance, label) -> tuple[tuple[str, np.ndarray], ...]:
    """PhraseCut-like phrases: each names a region, the union of everything it matches."""
    phrases = []
    for stuff, class_id in (("wall", WALL), ("floor", FLOOR)):
        mask = label == class_id
        if mask.any():
            phrases.append((stuff, mask))
    by_shape = _groups(range(len(objects)), lambda k: objects[k].shape)
    for shape, members in sorted(by_shape.items()):
        phrases.append((shape, np.isin(instance, members)))
        for colour, same in sorted(_groups(members, lambda k: objects[k].colour).items()):
            if len(same) < len(members):  # otherwise the same region as the shape phrase
                phrases.append((f"{colour} {shape}", np.isin(instance, same)))
    return tuple(phrases)


def _shade(rays, depth, surface, normal, objects, room: RoomStyle) -> np.ndarray:
    """Lambertian shading of flat colours; the floor is a checkerboard in metres (a perspective cue)."""
    dx, _ = rays
    x, z = depth * dx, depth
    tiles = (np.floor(x / room.tile_m) + np.floor(z / room.tile_m)).astype(np.int64) % 2
    floor_rgb = np.asarray(room.floor_rgb, dtype=np.float64)[tiles]
    albedo = np.where((surface == 0)[..., None], np.asarray(room.wall_rgb, dtype=np.float64), floor_rgb)
    for k, obj in enumerate(objects):
        albedo = np.where((surface == 2 + k)[..., None], np.asarray(COLOURS[obj.colour], np.float64), albedo)
    light = _AMBIENT + _DIFFUSE * np.clip(normal @ _LIGHT, 0.0, 1.0)
    return np.clip(np.round(albedo * light[..., None]), 0, 255).astype(np.uint8)
