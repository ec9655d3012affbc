"""Synthetic chest radiographs for the offline demo, drawn from Open-i MeSH annotations.

No installable package ships chest X-ray pixels, so the demo draws a deterministic,
chest-like grayscale picture for each Open-i image id. The findings it plants follow the
report's expert MeSH ``major`` terms (a right pleural effusion fills the right costophrenic
angle), and the bounding box of every planted finding is recorded for grounding. These
pictures are SYNTHETIC: they exercise the pipeline end to end and give learnable signal,
and say nothing about performance on real radiographs.

Orientation follows radiographic convention: the patient's right is on the image's left.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

logger = logging.getLogger(__name__)

# Version of the drawing code; part of the asset's code version, so a change redraws.
GENERATOR_VERSION = "synthetic-openi-v1"

# Query entity planted for each MeSH major heading (the part before the first "/").
MESH_TO_FINDING: dict[str, str] = {
    "Cardiomegaly": "cardiomegaly",
    "Pleural Effusion": "pleural effusion",
    "Pulmonary Atelectasis": "atelectasis",
    "Opacity": "opacity",
    "Airspace Disease": "opacity",
    "Infiltrate": "opacity",
    "Nodule": "nodule",
    "Mass": "mass",
    "Pneumothorax": "pneumothorax",
    "Emphysema": "emphysema",
    "Pulmonary Emphysema": "emphysema",
    "Pulmonary Disease, Chronic Obstructive": "emphysema",
    "Pulmonary Edema": "edema",
    "Pulmonary Congestion": "edema",
    "Catheters, Indwelling": "line",
    "Implanted Medical Device": "device",
}

# Every finding the generator can draw, in a fixed order.
PLANTED_FINDINGS: tuple[str, ...] = (
    "cardiomegaly", "pleural effusion", "atelectasis", "opacity", "nodule", "mass",
    "pneumothorax", "emphysema", "edema", "line", "device",
)


@dataclass(frozen=True)
class PlantedFinding:
    """One finding to draw: its query name, side and the MeSH term it came from."""

    finding: str
    side: str  # "right", "left" or "bilateral" (the patient's side)
    zone: str  # "base", "middle", "upper" or "any"
    severity: float  # 0.5 mild to 1.5 severe
    mesh: str


@dataclass
class SyntheticImage:
    """A drawn picture (uint8, H x W) and the boxes of its planted findings."""

    pixels: np.ndarray
    boxes: list[dict] = field(default_factory=list)


def findings_from_mesh(mesh_terms: list[str]) -> list[PlantedFinding]:
    """Translate Open-i MeSH major terms such as "Pleural Effusion/right/small" to findings.

    Terms with no drawable finding ("normal", "Thoracic Vertebrae", ...) are ignored, and
    each finding is planted at most once per side.
    """
    planted: dict[tuple[str, str], PlantedFinding] = {}
    for term in mesh_terms:
        heading, *modifiers = [part.strip() for part in term.split("/")]
        finding = MESH_TO_FINDING.get(heading)
        if finding is None:
            continue
        words = set(modifiers)
        if "bilateral" in words or ("right" in words and "left" in words):
            side = "bilateral"
        elif "right" in words:
            side = "right"
        elif "left" in words or "lingula" in words:
            side = "left"
        else:
            side = "bilateral" if finding in ("pleural effusion", "atelectasis", "edema", "emphysema") else "any"
        if words & {"base", "lower lobe"}:
            zone = "base"
        elif words & {"middle lobe", "lingula", "hilum"}:
            zone = "middle"
        elif words & {"apex", "upper lobe"}:
            zone = "upper"
        else:
            zone = "any"
        severity = 0.7 if words & {"mild", "small", "borderline", "minimal"} else (
            1.4 if words & {"severe", "large", "moderate"} else 1.0
        )
        planted.setdefault((finding, side), PlantedFinding(finding, side, zone, severity, term))
    return list(planted.values())


def _seed(image_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(image_id.encode("utf-8"), digest_size=8).digest(), "big")


class _Canvas:
    """Float image in [0, 1] with helpers that return pixel masks in image coordinates."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size = size
        self.rng = rng
        coords = np.arange(size, dtype=np.float32) / size
        self.y, self.x = np.meshgrid(coords, coords, indexing="ij")
        self.image = np.zeros((size, size), dtype=np.float32)

    def ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 <= 1.0

    def gaussian(self, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
        return np.exp(-(((self.x - cx) / sx) ** 2 + ((self.y - cy) / sy) ** 2) / 2.0)

    def smooth_noise(self, scale: int) -> np.ndarray:
        """Low-frequency noise in [-1, 1]: coarse random grid upsampled bilinearly."""
        coarse = self.rng.uniform(-1, 1, size=(scale + 1, scale + 1)).astype(np.float32)
        positions = np.linspace(0, scale, self.size, dtype=np.float32)
        low = np.floor(positions).astype(int).clip(0, scale - 1)
        frac = positions - low
        rows = coarse[low] * (1 - frac)[:, None] + coarse[low + 1] * frac[:, None]
        return rows[:, low] * (1 - frac)[None, :] + rows[:, low + 1] * frac[None, :]

    def box(self, mask: np.ndarray) -> tuple[int, int, int, int]:
        """Return the (x0, y0, x1, y1) pixel box of a mask, x1 and y1 exclusive."""
        ys, xs = np.nonzero(mask)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def draw_radiograph(image_id: str, findings: list[PlantedFinding], size: int = 128) -> SyntheticImage:
    """Draw one synthetic frontal chest radiograph with the given findings planted.

    The same image id, findings and size always give the same pixels.
    """
    rng = np.random.default_rng(_seed(image_id))
    canvas = _Canvas(size, rng)
    wanted = {f.finding for f in findings}

    # Anatomy with per-patient variation. Lungs are centred at x = 0.5 -/+ offset; the
    # patient's right lung is on the image's left.
    shift = rng.normal(0, 0.015)
    lung_offset = 0.19 + rng.normal(0, 0.01)
    lung_rx = 0.15 + rng.normal(0, 0.008)
    lung_ry = 0.29 + rng.normal(0, 0.01)
    lung_cy = 0.47 + rng.normal(0, 0.01)
    if "emphysema" in wanted:
        lung_rx *= 1.12
        lung_ry *= 1.13
        lung_cy += 0.02

    body = canvas.ellipse(0.5 + shift, 0.55, 0.46, 0.55)
    canvas.image[body] = 0.45
    lungs = {}
    for side, sign in (("right", -1), ("left", 1)):
        cx = 0.5 + shift + sign * lung_offset
        lungs[side] = (cx, canvas.ellipse(cx, lung_cy, lung_rx, lung_ry))
    lung_mask = lungs["right"][1] | lungs["left"][1]
    lung_level = 0.16 if "emphysema" not in wanted else 0.08
    canvas.image[lung_mask] = lung_level

    # Vascular markings: fine texture inside the lungs, fading towards the periphery.
    markings = np.clip(canvas.smooth_noise(24), 0, None) * 0.10
    canvas.image += np.where(lung_mask, markings, 0)

    # Diaphragm domes cut the lung bases.
    dome_level = lung_cy + lung_ry * 0.78
    for side, (cx, mask) in lungs.items():
        dome = canvas.y > dome_level - 0.06 * np.cos((canvas.x - cx) / lung_rx * np.pi / 2) ** 2
        if "emphysema" in wanted:
            dome = canvas.y > dome_level + 0.02
        canvas.image[mask & dome] = 0.50

    # Heart: centred slightly to the patient's left (image right).
    heart_scale = 1.0
    for f in findings:
        if f.finding == "cardiomegaly":
            heart_scale = 1.25 + 0.15 * f.severity
    heart_cx = 0.53 + shift
    heart_cy = lung_cy + 0.12
    heart = canvas.ellipse(heart_cx, heart_cy, 0.10 * heart_scale, 0.11 * min(heart_scale, 1.25))
    mediastinum = canvas.ellipse(0.5 + shift, lung_cy - 0.1, 0.055, 0.25)
    canvas.image[heart | mediastinum] = 0.62

    boxes: list[dict] = []

    def record(finding: PlantedFinding, mask: np.ndarray) -> None:
        if mask.any():
            x0, y0, x1, y1 = canvas.box(mask)
            boxes.append({"finding": finding.finding, "side": finding.side, "mesh": finding.mesh,
                          "x0": x0, "y0": y0, "x1": x1, "y1": y1})

    def sides_of(finding: PlantedFinding) -> list[str]:
        if finding.side == "bilateral":
            return ["right", "left"]
        if finding.side in ("right", "left"):
            return [finding.side]
        return [str(rng.choice(["right", "left"]))]

    def zone_y(zone: str) -> float:
        offsets = {"base": 0.45, "middle": 0.05, "upper": -0.4}
        offset = offsets.get(zone, rng.uniform(-0.35, 0.4))
        return lung_cy + offset * lung_ry

    for f in findings:
        if f.finding == "cardiomegaly":
            record(f, heart)
        elif f.finding == "pleural effusion":
            for side in sides_of(f):
                cx, mask = lungs[side]
                height = 0.08 + 0.06 * f.severity
                # The meniscus climbs towards the lateral chest wall.
                lateral = np.clip((canvas.x - cx) * (1 if side == "left" else -1) / lung_rx, 0, 1)
                fluid = mask & (canvas.y > dome_level - height - 0.06 * lateral)
                canvas.image[fluid] = 0.55 + rng.normal(0, 0.02)
                record(f, fluid)
        elif f.finding == "atelectasis":
            for side in sides_of(f):
                cx, mask = lungs[side]
                cy = zone_y(f.zone if f.zone != "any" else "base") - 0.04
                tilt = rng.uniform(-0.25, 0.25)
                band = mask & (np.abs(canvas.y - cy - tilt * (canvas.x - cx)) < 0.012 + 0.006 * f.severity)
                band &= np.abs(canvas.x - cx) < lung_rx * 0.75
                canvas.image[band] += 0.28
                record(f, band)
        elif f.finding in ("opacity", "edema"):
            if f.finding == "edema":
                haze = sum(canvas.gaussian(cx, lung_cy + 0.03, 0.08 * f.severity + 0.04, 0.12)
                           for cx, _ in lungs.values())
                region = lung_mask & (haze > 0.35)
                canvas.image += np.where(lung_mask, 0.22 * haze, 0)
                record(f, region)
                continue
            for side in sides_of(f):
                cx, mask = lungs[side]
                cy = zone_y(f.zone)
                px = cx + rng.uniform(-0.4, 0.4) * lung_rx
                blob = canvas.gaussian(px, cy, 0.045 * f.severity + 0.015, 0.04 * f.severity + 0.015)
                patchy = blob * (0.75 + 0.25 * canvas.smooth_noise(12))
                region = mask & (blob > 0.35)
                canvas.image += np.where(mask, 0.30 * patchy, 0)
                record(f, region)
        elif f.finding in ("nodule", "mass"):
            side = sides_of(f)[0]
            cx, mask = lungs[side]
            cy = zone_y(f.zone)
            px = cx + rng.uniform(-0.45, 0.45) * lung_rx
            radius = 0.022 if f.finding == "nodule" else 0.055
            spot = canvas.ellipse(px, cy, radius, radius) & mask
            canvas.image[spot] = 0.62 + rng.normal(0, 0.02)
            record(f, spot)
        elif f.finding == "pneumothorax":
            for side in sides_of(f):
                cx, mask = lungs[side]
                sign = -1 if side == "right" else 1
                rim = mask & (canvas.y < lung_cy - 0.05) & (sign * (canvas.x - cx) > -0.02)
                rim &= ~canvas.ellipse(cx - sign * 0.02, lung_cy + 0.04, lung_rx * 0.8, lung_ry * 0.85)
                canvas.image[rim] = 0.03
                record(f, rim)
        elif f.finding == "emphysema":
            record(f, lung_mask)
        elif f.finding == "line":
            side = sides_of(f)[0]
            sign = -1 if side == "right" else 1
            t = np.linspace(0, 1, size * 3)
            xs = 0.5 + shift + sign * (0.30 - 0.27 * t)
            ys = 0.12 + 0.30 * t ** 1.3
            mask = np.zeros_like(lung_mask)
            cols = np.clip((xs * size).astype(int), 0, size - 1)
            rows = np.clip((ys * size).astype(int), 0, size - 1)
            for dx in (0, 1):
                mask[rows, np.clip(cols + dx, 0, size - 1)] = True
            canvas.image[mask] = 0.9
            record(f, mask)
        elif f.finding == "device":
            box_mask = canvas.ellipse(0.5 + shift + 0.27, 0.16, 0.05, 0.03)
            canvas.image[box_mask] = 0.92
            record(f, box_mask)

    # Exposure, quantum noise and a vignette, all varying per patient.
    gain = rng.uniform(0.85, 1.15)
    canvas.image = canvas.image * gain + rng.normal(0, 0.025, size=canvas.image.shape)
    canvas.image *= 1.0 - 0.4 * ((canvas.x - 0.5) ** 2 + (canvas.y - 0.5) ** 2)
    pixels = (np.clip(canvas.image, 0, 1) * 255).astype(np.uint8)
    return SyntheticImage(pixels=pixels, boxes=boxes)


def split_of(report_id: str, valid_fraction: float = 0.1, test_fraction: float = 0.2) -> str:
    """Return "train", "valid" or "test" for a report: stable, and the same for all its images."""
    value = int.from_bytes(hashlib.blake2b(f"split:{report_id}".encode(), digest_size=8).digest(), "big") / 2**64
    if value < test_fraction:
        return "test"
    if value < test_fraction + valid_fraction:
        return "valid"
    return "train"


def generate_openi_images(
    reports: pl.DataFrame,
    output_dir: str | Path,
    *,
    size: int = 128,
    images_per_report: int = 1,
    max_reports: int | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Draw synthetic images for Open-i reports and write them as 8-bit grayscale PNG files.

    ``reports`` needs ``report_id``, ``image_ids`` and ``mesh`` columns. Reports without
    image ids get none. Returns the manifest (image_id, report_id, path, split, source,
    findings) and the annotations (image_id, finding, side, mesh, x0, y0, x1, y1).
    """
    from PIL import Image

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_rows = []
    annotation_rows = []
    selected = reports.sort("report_id")
    if max_reports is not None:
        selected = selected.head(max_reports)
    for row in selected.iter_rows(named=True):
        findings = findings_from_mesh(list(row["mesh"] or []))
        for image_id in list(row["image_ids"] or [])[:images_per_report]:
            drawn = draw_radiograph(image_id, findings, size=size)
            path = output_dir / f"{image_id}.png"
            tmp = path.with_name(f".{path.name}.tmp")
            Image.fromarray(drawn.pixels, mode="L").save(tmp, format="PNG")
            tmp.replace(path)
            manifest_rows.append({
                "image_id": image_id,
                "report_id": row["report_id"],
                "path": str(path),
                "split": split_of(row["report_id"]),
                "source": "synthetic-openi",
                "findings": sorted({box["finding"] for box in drawn.boxes}),
            })
            for box in drawn.boxes:
                annotation_rows.append({"image_id": image_id, **box})
    logger.info("Drew %d synthetic images with %d planted findings in %s",
                len(manifest_rows), len(annotation_rows), output_dir)
    manifest = pl.DataFrame(manifest_rows, schema={
        "image_id": pl.String, "report_id": pl.String, "path": pl.String, "split": pl.String,
        "source": pl.String, "findings": pl.List(pl.String),
    })
    annotations = pl.DataFrame(annotation_rows, schema={
        "image_id": pl.String, "finding": pl.String, "side": pl.String, "mesh": pl.String,
        "x0": pl.Int32, "y0": pl.Int32, "x1": pl.Int32, "y1": pl.Int32,
    })
    return manifest, annotations
