"""Where each file of a reference library lives. One place, so no stage guesses."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from refbuild.errors import RefbuildError


@dataclass(frozen=True)
class Library:
    root: Path

    @property
    def faces(self) -> Path:
        return self.root / "faces.parquet"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects.parquet"

    def features(self, view: str = "hr") -> Path:
        return self.root / ("features.parquet" if view == "hr" else f"features_{view}.parquet")

    @property
    def splits(self) -> Path:
        return self.root / "splits.parquet"

    @property
    def pairs(self) -> Path:
        return self.root / "pairs.parquet"

    @property
    def crops(self) -> Path:
        return self.root / "crops"

    def config(self, stage: str) -> Path:
        return self.root / f"{stage}.config.json"

    def require(self, path: Path, stage: str) -> Path:
        if not path.is_file():
            cmd = f"refbuild detect PHOTOS/ --out {self.root}" if stage == "detect" else f"refbuild {stage} {self.root}"
            raise RefbuildError(f"{path}: missing; run `{cmd}` first")
        return path

    def safe_path(self, rel: str) -> Path:
        """Resolve a library-relative path, refusing absolute paths and `..`."""
        p = Path(rel)
        if p.is_absolute() or ".." in p.parts:
            raise RefbuildError(f"{self.root}: path {rel!r} escapes the library; rebuild the library")
        return self.root / p
