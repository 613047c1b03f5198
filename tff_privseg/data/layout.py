"""Find the sites under a dataset root and the CT/label file pairs of each site.

A root folder holds one sub-folder per site (hidden folders such as ``.cache`` are skipped).
A site is either in Medical Segmentation Decathlon layout::

    SITE/dataset.json     {"labels": {"0": "background", ...},
                           "training": [{"image": "./imagesTr/x.nii.gz",
                                         "label": "./labelsTr/x.nii.gz"}, ...]}
    SITE/imagesTr/  SITE/labelsTr/

(without ``dataset.json``, ``imagesTr``/``labelsTr`` are matched by file name), or::

    SITE/images/*.nii(.gz)   SITE/labels/*.nii(.gz)     matched by file name.

In both, a file may also be NRRD (``x.nrrd`` image, ``x.nrrd`` or 3D Slicer ``x.seg.nrrd``
label; see ``data.nrrd``). The case id is the file name without ``.nii``/``.nii.gz``/
``.nrrd``/``.seg.nrrd`` (and without an nnU-Net ``_0000`` channel suffix).

Or a site holds DICOM, as exported from a PACS and a contouring system, one folder per patient::

    SITE/<case>/            the case id is the folder name
        CT series           loose slice files, or in sub-folders (any names)
        one label file      a DICOM-SEG or an RTSTRUCT, anywhere in <case>/

Files are told apart by their DICOM Modality (CT, SEG, RTSTRUCT), never by name; other DICOM
objects and non-DICOM files are ignored, hidden files are skipped. A case folder needs exactly
one CT series and one label file (see ``data.dicom`` for what is checked when it is read).
A site is taken as DICOM when it has no dataset.json, imagesTr/ or images/ folder.

A case id may occur at one site only: one patient, one hospital.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tff_privseg.errors import UserError

Layout = Literal["auto", "msd", "images_labels", "dicom"]
NIFTI_SUFFIXES = (".nii.gz", ".nii")
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, ".seg.nrrd", ".nrrd")


@dataclass(frozen=True)
class CaseFiles:
    """One case's input. ``kind="files"``: ``image`` and ``label`` are NIfTI or NRRD files
    (read by suffix). ``kind="dicom"``: ``image`` is the folder of the CT series, ``label`` the
    SEG or RTSTRUCT file. ``files`` lists every file the case is read from (the cache key
    hashes them all); empty means (image, label)."""

    site: str
    case: str
    image: Path
    label: Path
    kind: Literal["files", "dicom"] = "files"
    files: tuple[Path, ...] = ()

    @property
    def all_files(self) -> tuple[Path, ...]:
        return self.files or (self.image, self.label)


@dataclass(frozen=True)
class SiteFiles:
    name: str
    path: Path
    layout: Literal["msd", "images_labels", "dicom"]
    cases: tuple[CaseFiles, ...]
    # Class names declared by dataset.json ({} when there is none): {0: "background", ...}.
    labels: dict[int, str] = field(default_factory=dict)


def case_id(path: Path) -> str | None:
    """``liver_3.nii.gz`` -> ``liver_3``; None for files that are not NIfTI or NRRD."""
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            stem = name[: -len(suffix)]
            return stem[:-5] if stem.endswith("_0000") else stem
    return None


def _utf8_name(path: Path, what: str) -> None:
    """Site and case names travel into JSON, TOML and CSV: they must be text."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} name is not valid UTF-8; rename it", path) from None


def check_readable_file(path: Path) -> None:
    """A CT or label file must be a readable regular file (a symlink to one is fine)."""
    if not path.is_file():  # (follows symlinks; False for loops and dangling links)
        if path.is_symlink():
            try:
                path.stat()
                why = "a symlink to something that is not a regular file"
            except OSError as e:
                why = "a symlink loop" if e.errno == errno.ELOOP else "a broken symlink"
            raise UserError(f"{why} (-> {os.readlink(path)})", path)
        raise UserError("not a regular file", path)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise UserError(f"cannot read the file ({e.strerror or e})", path) from None


def _nifti_files(folder: Path) -> dict[str, Path]:
    """Case id -> file, for the visible NIfTI files of a folder (macOS ``._x`` files skipped).

    A NIfTI name that is no readable file (a broken or looping symlink, a folder, no read
    permission) is an error, not silently one patient fewer."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        cid = case_id(path)
        if cid is None or path.name.startswith("."):
            continue
        _utf8_name(path, "file")
        check_readable_file(path)
        if cid in found:
            raise UserError(f"two files for case '{cid}' ({found[cid].name})", path)
        found[cid] = path
    return found


def _pair_by_name(site: Path, images_dir: Path, labels_dir: Path) -> list[CaseFiles]:
    images, labels = _nifti_files(images_dir), _nifti_files(labels_dir)
    for cid, path in images.items():
        if cid not in labels:
            raise UserError(f"image has no label (expected it in {labels_dir.name}/)", path)
    for cid, path in labels.items():
        if cid not in images:
            raise UserError(f"label has no image (expected it in {images_dir.name}/)", path)
    return [CaseFiles(site.name, cid, images[cid], labels[cid]) for cid in sorted(images)]


def _declared_labels(raw: object, path: Path) -> dict[int, str]:
    """MSD ``{"0": "background"}`` or nnU-Net v2 ``{"background": 0}`` -> {0: "background"}."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError('"labels" must be an object of class id -> name', path)
    out: dict[int, str] = {}
    for key, value in raw.items():
        if str(key).lstrip("-").isdigit():
            out[int(key)] = str(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            out[value] = str(key)
    return out


def _read_msd(site: Path) -> SiteFiles:
    meta = site / "dataset.json"
    if not meta.is_file():
        if (site / "imagesTr").is_dir() and (site / "labelsTr").is_dir():
            cases = _pair_by_name(site, site / "imagesTr", site / "labelsTr")
            return SiteFiles(site.name, site, "msd", tuple(cases))
        raise UserError("no dataset.json (and no imagesTr/ + labelsTr/) in this site", site)
    try:
        spec = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"not valid JSON ({e})", meta) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("training"), list):
        raise UserError('needs a "training" list of {"image": ..., "label": ...}', meta)
    cases: dict[str, CaseFiles] = {}
    for i, entry in enumerate(spec["training"]):
        if not isinstance(entry, dict) or not {"image", "label"} <= entry.keys():
            raise UserError(f'training[{i}] needs "image" and "label"', meta)
        image, label = site / entry["image"], site / entry["label"]
        for path in (image, label):
            if not path.is_file() and not path.is_symlink():
                raise UserError(f"file listed in dataset.json (training[{i}]) is missing", path)
            check_readable_file(path)
        cid = case_id(image)
        if cid is None:
            raise UserError(f"training[{i}] image is not a .nii/.nii.gz/.nrrd file", meta)
        if cid in cases:
            raise UserError(f"case '{cid}' is listed twice in training", meta)
        cases[cid] = CaseFiles(site.name, cid, image, label)
    labels = _declared_labels(spec.get("labels"), meta)
    return SiteFiles(site.name, site, "msd", tuple(cases[c] for c in sorted(cases)), labels)


def _read_images_labels(site: Path) -> SiteFiles:
    if not ((site / "images").is_dir() and (site / "labels").is_dir()):
        raise UserError("expected images/ and labels/ folders in this site", site)
    return SiteFiles(
        site.name,
        site,
        "images_labels",
        tuple(_pair_by_name(site, site / "images", site / "labels")),
    )


def _read_dicom(site: Path) -> SiteFiles:
    """One case per visible sub-folder, holding a CT series and a SEG or RTSTRUCT file."""
    from tff_privseg.data.dicom import find_case  # noqa: PLC0415 - pydicom

    cases = []
    for folder in sorted(p for p in site.iterdir() if not p.name.startswith(".")):
        if not folder.is_dir():
            continue
        _utf8_name(folder, "case folder")
        image_dir, files, label = find_case(folder)
        for path in (*files, label):
            check_readable_file(path)
        cases.append(CaseFiles(site.name, folder.name, image_dir, label, "dicom", (*files, label)))
    return SiteFiles(site.name, site, "dicom", tuple(cases))


def _detect(site: Path) -> Literal["msd", "images_labels", "dicom"]:
    if (site / "dataset.json").is_file() or (site / "imagesTr").is_dir():
        return "msd"
    if (site / "images").is_dir():
        return "images_labels"
    if any(p.is_dir() and not p.name.startswith(".") for p in site.iterdir()):
        return "dicom"
    raise UserError(
        "empty site: no dataset.json, imagesTr/, images/ + labels/ or DICOM case folders found",
        site,
    )


def discover_sites(root: str | Path, layout: Layout = "auto") -> list[SiteFiles]:
    """All sites under ``root`` (sorted by name), each with its cases (sorted by case id)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError("dataset folder not found" if not root.exists() else "not a folder", root)
    if (root / "dataset.json").is_file() or (root / "imagesTr").is_dir():
        raise UserError(
            "this folder is itself one site; pass the folder that holds the site folders", root
        )
    entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    for p in entries:
        if p.is_symlink() and not p.exists():
            raise UserError("a broken symlink or symlink loop where a site folder may be", p)
    folders = [p for p in entries if p.is_dir()]
    if not folders:
        raise UserError("no site folders found (expected one sub-folder per site)", root)
    sites: list[SiteFiles] = []
    seen: dict[str, str] = {}
    for folder in folders:
        _utf8_name(folder, "site folder")
        kind = _detect(folder) if layout == "auto" else layout
        readers = {"msd": _read_msd, "images_labels": _read_images_labels, "dicom": _read_dicom}
        site = readers[kind](folder)
        if not site.cases:
            raise UserError("empty site: no CT/label pairs found", folder)
        for case in site.cases:
            if case.case in seen:
                raise UserError(
                    f"case '{case.case}' is also at site '{seen[case.case]}'; "
                    "a patient may belong to one site only",
                    case.image,
                )
            seen[case.case] = site.name
        sites.append(site)
    return sites
