"""Stains: where a crop's two dyes point in optical density, whether a smear's stain is one
the classifier was trained on, and redrawing a crop in that stain.

A Romanowsky stain (Wright, Giemsa, May-Grunwald) is two dyes: eosin (pink-orange) and an azure
or methylene blue (blue-purple). In optical density (OD = -log(I / 256)) the amounts of dye add
up linearly, so each pixel is a mix of two directions, one per dye. `stain_axes` estimates those
directions per crop, as Macenko et al. (2009) do for histology. They depend on the dyes, the
lamp and the camera, and much less on what the crop shows, which makes them a fingerprint of the
lab's staining.

`StainReference` keeps those fingerprints for the microscopes a classifier was trained on (one
Gaussian per training source) and measures how far a new crop's stain lies from all of them. A
classifier is unreliable on stains unlike any it saw (see the model card, "Robustness: a
microscope left out"), and it is also confidently wrong there, so its probabilities cannot flag
those cells on their own; the distance can.

`StainTarget` redraws a crop in another stain: the crop's own dye directions and amounts are
measured against its own white point, and the same amounts of the target's dyes are drawn. The
pipeline uses it, when asked (`AnalysisParams.stain_normalise`), for the cells that
`StainReference` flags, so that the classifier sees them in the stain it knows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: pixels whose summed OD is below this are glass or plasma, not stain
STAINED_OD = 0.3
#: a crop needs this many stained pixels for its stain directions to be estimated
MIN_STAINED = 64
#: training crops farther than this percentile of their own distances set the threshold
THRESHOLD_PERCENTILE = 99.0
#: a source with few crops borrows its covariance from the pooled one, with weight SHRINK / n
SHRINK = 30.0
#: no feature's spread counts as smaller than this (real sources spread 0.08 to 0.3), so that a
#: very uniform training set does not flag crops over differences of resampling and rounding
MIN_STD = 0.01


def optical_density(rgb: np.ndarray, white=255.0) -> np.ndarray:
    """uint8 RGB -> float64 optical density per channel (0 for `white`, larger for more dye)."""
    return -np.log((rgb.astype(np.float64) + 1.0) / (np.asarray(white, np.float64) + 1.0))


def stain_axes(od: np.ndarray) -> np.ndarray | None:
    """The two stain directions of a crop in optical density (rows of a 3x3 basis whose third
    row completes it), estimated as in Macenko et al. 2009: the stained pixels' two main axes,
    and the extreme angles (1st and 99th percentile) within that plane. None when the crop has
    too few stained pixels or the two directions coincide."""
    flat = od.reshape(-1, 3)
    stained = flat[flat.sum(axis=1) > STAINED_OD]
    if len(stained) < MIN_STAINED:
        return None
    _, vecs = np.linalg.eigh(np.cov(stained.T))
    plane = vecs[:, 1:] * np.where(vecs[:, 1:].sum(axis=0) < 0, -1.0, 1.0)
    proj = stained @ plane
    lo, hi = np.percentile(np.arctan2(proj[:, 1], proj[:, 0]), [1, 99])
    axes = [plane @ np.array([np.cos(a), np.sin(a)]) for a in (lo, hi)]
    axes.append(np.cross(axes[0], axes[1]))
    basis = np.array(axes, np.float64)
    if abs(np.linalg.det(basis)) < 1e-3:
        return None
    return basis


def stain_features(rgb: np.ndarray) -> np.ndarray | None:
    """A crop's stain fingerprint: the 6 distinct entries of v1 v1' + v2 v2' for its two unit
    stain directions. Which dye is "first" does not matter, so no dye has to be named. None when
    the crop has no two stains (`stain_axes`). The three diagonal entries always sum to 2, so one
    direction of the 6 carries nothing; MIN_STD keeps the covariances invertible along it."""
    basis = stain_axes(optical_density(rgb))
    if basis is None:
        return None
    v = basis[:2] / np.linalg.norm(basis[:2], axis=1, keepdims=True)
    return (np.outer(v[0], v[0]) + np.outer(v[1], v[1]))[np.triu_indices(3)]


@dataclass(frozen=True)
class StainReference:
    """One Gaussian (mean, inverse covariance) of stain features per training source, and the
    distance beyond which a crop's stain is unlike all of them."""

    sources: tuple       # source names, in the order of `means` and `inv_covs`
    means: np.ndarray    # (S, 6)
    inv_covs: np.ndarray  # (S, 6, 6)
    threshold: float

    @classmethod
    def fit(cls, crops_by_source: dict) -> "StainReference | None":
        """Fit on each source's run-time crops (uint8 RGB). The threshold is the
        THRESHOLD_PERCENTILE of the training crops' own distances, so about 1 % of crops like the
        training ones are flagged. None when fewer than 2 features could be measured anywhere."""
        feats = {}
        for name, crops in sorted(crops_by_source.items()):
            f = [v for v in map(stain_features, crops) if v is not None]
            if len(f) >= 2:
                feats[name] = np.array(f)
        if not feats:
            return None
        everything = np.concatenate(list(feats.values()))
        pooled = np.cov(everything.T) if len(everything) > 1 else np.eye(6)
        means, invs = [], []
        for f in feats.values():
            w = min(1.0, SHRINK / len(f))
            cov = (1 - w) * np.cov(f.T) + w * pooled + MIN_STD ** 2 * np.eye(6)
            means.append(f.mean(axis=0))
            invs.append(np.linalg.inv(cov))
        # rounded as stored in bundle.json, so the threshold fits the numbers a run will use
        ref = cls(tuple(feats), np.round(means, 6), np.round(invs, 4), 0.0)
        threshold = float(np.percentile(ref.distances(everything), THRESHOLD_PERCENTILE))
        return cls(ref.sources, ref.means, ref.inv_covs, round(threshold, 4))

    def distances(self, feats: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each feature row (N, 6) to the nearest source."""
        feats = np.atleast_2d(feats)
        z = feats[None, :, :] - self.means[:, None, :]
        d2 = np.einsum("snj,sjk,snk->sn", z, self.inv_covs, z)
        return np.sqrt(np.maximum(d2, 0.0)).min(axis=0)

    def distance(self, rgb: np.ndarray) -> float | None:
        """How far a crop's stain lies from every training source; None when it has no two stains."""
        f = stain_features(rgb)
        return None if f is None else float(self.distances(f)[0])

    def to_meta(self) -> dict:
        return {"sources": list(self.sources), "means": self.means.tolist(),
                "inv_covs": self.inv_covs.tolist(), "threshold": self.threshold,
                "features": "stain.stain_features", "percentile": THRESHOLD_PERCENTILE}

    @classmethod
    def from_meta(cls, meta: dict) -> "StainReference":
        """From bundle.json; ValueError when a part is missing or of the wrong shape."""
        try:
            ref = cls(tuple(meta["sources"]), np.asarray(meta["means"], np.float64),
                      np.asarray(meta["inv_covs"], np.float64), float(meta["threshold"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"stain_reference: {type(exc).__name__}: {exc}") from None
        n = len(ref.sources)
        if n == 0 or ref.means.shape != (n, 6) or ref.inv_covs.shape != (n, 6, 6) \
                or not (np.isfinite(ref.means).all() and np.isfinite(ref.inv_covs).all()
                        and np.isfinite(ref.threshold)):
            raise ValueError(f"stain_reference: {n} sources need means ({n}, 6) and inv_covs "
                             f"({n}, 6, 6) of finite numbers; got {ref.means.shape} and "
                             f"{ref.inv_covs.shape}")
        return ref


# --- redrawing a crop in another stain -------------------------------------------------------------

#: a crop's white point is this percentile of each channel (its plasma or glass), at least WHITE_MIN
WHITE_PERCENTILE = 99.0
WHITE_MIN = 8.0
#: a dye's amount in a crop is this percentile of its stained pixels' amounts
AMOUNT_PERCENTILE = 99.0
#: StainTarget.fit measures at most this many crops (a seeded choice)
TARGET_CROPS = 800
#: a crop whose two dye directions are closer than this percentile of the target's own crops is not
#: redrawn: a pale or grey crop's dyes cannot be told apart, and unmixing them makes it worse
MIN_ANGLE_PERCENTILE = 1.0


def balanced_od(rgb: np.ndarray) -> np.ndarray:
    """Optical density against the crop's own white point (the brightest 1 % of each channel),
    not against 255: a yellow or grey background becomes white, as a white balance would make it."""
    white = np.maximum(np.percentile(rgb.reshape(-1, 3), WHITE_PERCENTILE, axis=0), WHITE_MIN)
    return np.maximum(optical_density(rgb, white), 0.0)


def dye_directions(od: np.ndarray) -> np.ndarray | None:
    """The crop's two unit dye directions (2, 3), the blue dye (azure, methylene blue: absorbs
    red most) first and eosin (absorbs green most) second; None as for `stain_axes`."""
    basis = stain_axes(od)
    if basis is None:
        return None
    v = basis[:2] / np.linalg.norm(basis[:2], axis=1, keepdims=True)
    return v if v[0, 0] - v[0, 1] >= v[1, 0] - v[1, 1] else v[::-1]


def dye_amounts(od: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Each pixel's amount of the two dyes (N, 2): least squares of OD on the directions."""
    amounts, *_ = np.linalg.lstsq(directions.T, od.reshape(-1, 3).T, rcond=None)
    return amounts.T


def dye_angle(directions: np.ndarray) -> float:
    """The angle between a crop's two unit dye directions, in degrees."""
    return float(np.degrees(np.arccos(np.clip(directions[0] @ directions[1], -1.0, 1.0))))


def _measure(rgb: np.ndarray):
    """(od, directions, typical amounts (2,)) of a crop, or None when it has no two stains."""
    od = balanced_od(rgb)
    directions = dye_directions(od)
    if directions is None:
        return None
    stained = od.reshape(-1, 3).sum(axis=1) > STAINED_OD
    typical = np.percentile(dye_amounts(od, directions)[stained], AMOUNT_PERCENTILE, axis=0)
    return od, directions, np.maximum(typical, 1e-3)


@dataclass(frozen=True)
class StainTarget:
    """The stain crops are redrawn in: two dye directions (2, 3) and their typical amounts (2,);
    crops whose dye directions are closer than `min_angle` degrees are left as they are."""

    directions: np.ndarray
    amounts: np.ndarray
    min_angle: float = 0.0

    @classmethod
    def fit(cls, crops: list, seed: int = 0) -> "StainTarget | None":
        """Mean directions and median typical amounts of up to TARGET_CROPS of `crops` (uint8
        RGB, a seeded choice), and the MIN_ANGLE_PERCENTILE of their dye angles; None when none
        has two stains."""
        rng = np.random.default_rng(seed)
        chosen = rng.choice(len(crops), min(TARGET_CROPS, len(crops)), replace=False) if crops else []
        measured = [m for m in (_measure(crops[i]) for i in chosen) if m is not None]
        if not measured:
            return None
        return cls(np.round(np.mean([m[1] for m in measured], axis=0), 6),
                   np.round(np.median([m[2] for m in measured], axis=0), 6),
                   round(float(np.percentile([dye_angle(m[1]) for m in measured], MIN_ANGLE_PERCENTILE)), 3))

    def redraw(self, rgb: np.ndarray) -> np.ndarray:
        """The crop with its dyes replaced by the target's, each scaled so that its typical amount
        becomes the target's, on a white background. A crop without two stains, or with two closer
        than `min_angle`, is returned as is."""
        measured = _measure(rgb)
        if measured is None or dye_angle(measured[1]) < self.min_angle:
            return rgb
        od, directions, typical = measured
        amounts = np.clip(dye_amounts(od, directions), 0.0, None) * (self.amounts / typical)
        out = 256.0 * np.exp(-(amounts @ self.directions)) - 1.0
        return np.clip(np.rint(out), 0, 255).astype(np.uint8).reshape(rgb.shape)

    def to_meta(self) -> dict:
        return {"directions": self.directions.tolist(), "amounts": self.amounts.tolist(),
                "min_angle": self.min_angle, "white_percentile": WHITE_PERCENTILE,
                "amount_percentile": AMOUNT_PERCENTILE, "min_angle_percentile": MIN_ANGLE_PERCENTILE}

    @classmethod
    def from_meta(cls, meta: dict) -> "StainTarget":
        """From bundle.json; ValueError when a part is missing or of the wrong shape."""
        try:
            target = cls(np.asarray(meta["directions"], np.float64),
                         np.asarray(meta["amounts"], np.float64), float(meta.get("min_angle", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"stain_target: {type(exc).__name__}: {exc}") from None
        if target.directions.shape != (2, 3) or target.amounts.shape != (2,) \
                or not (np.isfinite(target.directions).all() and np.isfinite(target.amounts).all()):
            raise ValueError(f"stain_target needs directions (2, 3) and amounts (2,) of finite "
                             f"numbers; got {target.directions.shape} and {target.amounts.shape}")
        return target
