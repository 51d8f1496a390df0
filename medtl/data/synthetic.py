"""A fully synthetic, deterministic demo data set: chest radiographs and small CT series.

Every patient, name, identifier, date and institution here is invented. The data imitate what a
hospital export looks like (CR/DX radiographs in several encodings, CT series with unordered
file names, fake identifying values in headers, free text, private tags and path names, a few
files that are not images) so that discovery, de-identification, training and the bias audit
all have something real to do. One subgroup carries a planted performance gap; see
`PLANTED_GAP` and docs/demo_data.md.

Example:
    >>> summary = write_demo_data(Path("demo_data"), patients=200, seed=0, progress=False)
    >>> summary.labels_csv.name
    'labels.csv'
"""

from __future__ import annotations

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)
from skimage.filters import gaussian
from tqdm import tqdm

from medtl.errors import InputError

XR_SIZE = 128
XR_SPACING_MM = 2.8
CT_SIZE = 48
CT_PIXEL_MM = 0.8
CT_SLICE_MM = 2.5
MIN_PATIENTS = 10  # one patient per age decade at least
GAP_SITE = 2  # index into SITES of the site with the planted gap
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class _Site:
    name: str
    address: str
    code: str
    share: float
    scanners: tuple[tuple[str, str, str, str], ...]  # manufacturer, model, modality, station
    ct_scanner: tuple[str, str, str]  # manufacturer, model, station
    physicians: tuple[str, ...]
    operators: tuple[str, ...]


SITES = (
    _Site("Northgate General Hospital", "1200 Northgate Avenue, Springfield, IL 62701", "NGH", 0.23,
          (("Siemens Healthineers", "Ysio Max", "DX", "NGH-XR01"),
           ("Philips", "DigitalDiagnost C90", "DX", "NGH-XR02")),
          ("Siemens Healthineers", "SOMATOM go.Up", "NGH-CT01"),
          ("OKAFOR^CHIDI", "LINDQVIST^MARTA"), ("PATEL^ANITA", "BRENNAN^TOM")),
    _Site("Riverside Medical Center", "45 River Road, Shelbyville, IL 62565", "RMC", 0.23,
          (("GE Healthcare", "Discovery XR656", "DX", "RMC-DR1"),
           ("Carestream Health", "DRX-Evolution Plus", "DX", "RMC-DR2")),
          ("GE Healthcare", "Revolution EVO", "RMC-CT1"),
          ("HOLLOWAY^GRACE", "NAKAMURA^KENJI"), ("SANTOS^LUIS", "QUINN^MAEVE")),
    _Site("St. Brigid Community Hospital", "9 Chapel Lane, Ogdenville, IL 62999", "SBC", 0.31,
          (("FUJIFILM Corporation", "FCR Capsula XL II", "CR", "SBC-PORT1"),
           ("Carestream Health", "DRX-Revolution", "DX", "SBC-PORT2")),
          ("Canon Medical Systems", "Aquilion Lightning", "SBC-CT1"),
          ("ABERNATHY^RUTH", "DUBOIS^HENRI"), ("KOWALSKI^PIOTR", "MBEKI^THANDI")),
    _Site("Lakeside Imaging Clinic", "300 Lakeshore Drive, North Haverbrook, IL 60001", "LIC", 0.23,
          (("Agfa", "CR 30-X", "CR", "LIC-CR1"), ("Konica Minolta", "AeroDR fine", "DX", "LIC-DR1")),
          ("Philips", "Incisive CT", "LIC-CT1"),
          ("FERREIRA^ANA", "MORGENSTERN^ELI"), ("HUANG^WEI", "OLSEN^BIRGIT")),
)

PLANTED_GAP = (
    f"Radiographs from site '{SITES[GAP_SITE].name}' (InstitutionName; portable AP films from its two "
    f"scanners, about {SITES[GAP_SITE].share:.0%} of patients) show the opacity fainter and smaller, with "
    "opacity-like electrode/line shadows in either class and more noise, so a classifier's AUROC there is "
    "far lower (about 0.5-0.7) than at the other sites (above 0.98); sex and age bands carry no gap."
)

_FEMALE = tuple(
    "JANE MARGARET AMARA LUCIA INGRID PRIYA HANNA SOFIA NOOR EVELYN ROSALIND YUKI FATIMA CLARA "
    "BEATRIX OLUWASEUN MARISOL GRETA".split()
)
_MALE = tuple(
    "JOHN ARTHUR KWAME MATEO LARS RAVI TOBIAS DMITRI OMAR FELIX DESMOND HIROSHI IBRAHIM "
    "CORNELIUS BARNABY EMEKA JOAQUIN GUNNAR".split()
)
_LAST = tuple(
    "DOE ROE FAIRWEATHER QUIGLEY ABERCROMBIE VANTERPOOL MCALLISTER ODUYA HALVORSEN PETROVSKY "
    "DELACROIX WINTERBOTTOM CASTELLANOS BRIGHTWATER THORNBURY ASHWORTH MALLORY KINGSLEY "
    "FENWICK GALLAGHER IWASAKI NWOSU ROSENQUIST TREMBLAY".split()
)


@dataclass(frozen=True)
class DemoSummary:
    """What `write_demo_data` wrote. Identifying values are fake but must be treated as PHI.

    Attributes:
        root: The output folder.
        labels_csv: `root/labels.csv` (columns path, label, mask, patient_id).
        n_patients: Patients written (not counting the two in `unlabelled_files`).
        n_studies: Studies written (radiograph and CT studies of those patients).
        n_radiographs: Radiograph rows in labels.csv.
        n_ct_series: CT series rows in labels.csv.
        phi_strings: Every fake identifying string written into headers, free text and path names
            that is safe to search for as a substring (names in each written form, MRNs, accession
            numbers, UIDs, institutions, addresses, physicians, operators, station names).
        phi_dates: Birth and study dates as written in headers (YYYYMMDD). Kept apart because
            eight digits also occur inside numbers: search for them as whole tokens only.
        planted_gap: One line describing the planted subgroup gap.
        gap_institution: InstitutionName of the site with the gap (fake, in memory only).
        unlabelled_files: Paths relative to `root` that are in no labels.csv row: a Basic Text SR,
            a truncated DICOM and a text file.
    """

    root: Path
    labels_csv: Path
    n_patients: int
    n_studies: int
    n_radiographs: int
    n_ct_series: int
    phi_strings: frozenset[str]
    phi_dates: frozenset[str]
    planted_gap: str
    gap_institution: str
    unlabelled_files: tuple[Path, ...]


@dataclass(frozen=True)
class _Patient:
    index: int
    mrn: str
    last: str
    first: str
    sex: str
    age: int
    site: int
    age_tag: bool  # False: only birth date + study date, the age must be derived
    named_paths: bool  # folder and file names carry the name, birth date and MRN


@dataclass(frozen=True)
class _StudyPlan:
    index: int
    patient: _Patient
    kind: str  # "xr" or "ct"
    date: dt.date
    birth: dt.date
    accession: str
    label: int


def write_demo_data(
    out_dir: Path, *, patients: int = 200, seed: int = 0, progress: bool = True
) -> DemoSummary:
    """Write a synthetic DICOM/NIfTI data set with fake PHI, labels and a planted subgroup gap.

    Args:
        out_dir: A new or empty folder to write into.
        patients: Number of fake patients (at least 10 so every age band appears).
        seed: Seed of every random choice: the same seed writes byte-identical files.
        progress: Show a tqdm progress bar over studies.

    Returns:
        A `DemoSummary` of what was written.

    Raises:
        InputError: If `out_dir` is a non-empty folder or a file, or `patients` is too small.
    """
    out_dir = Path(out_dir)
    if isinstance(patients, bool) or not isinstance(patients, int) or patients < MIN_PATIENTS:
        raise InputError(f"patients must be an integer >= {MIN_PATIENTS}, not {patients!r}; ask for more")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        found = "folder with files" if out_dir.is_dir() else "file"
        raise InputError(f"out_dir must be a new or empty folder, not an existing {found} ({out_dir}); "
                         "choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    people = _plan_patients(rng, patients)
    studies = _plan_studies(rng, people)
    uid_rng = np.random.default_rng([seed, 1])
    phi: set[str] = set(_site_phi())
    dates: set[str] = set()
    rows: list[dict[str, str]] = []
    used_names: dict[str, int] = {}
    folders: list[tuple[Path, str]] = []  # (folder, StudyInstanceUID) per study
    for study in tqdm(studies, desc="demo studies", unit="study", disable=not progress):
        study_rng = np.random.default_rng([seed, 2, study.index])
        folders.append((_study_folder(study, used_names), _uid(uid_rng)))
        phi.update(_patient_phi(study.patient, study.birth))
        phi.update({study.accession, folders[-1][1]})
        dates.update({_da(study.birth), _da(study.date)})
        write = _write_radiograph if study.kind == "xr" else _write_ct
        rows.append(write(out_dir, *folders[-1], study, study_rng, uid_rng, phi))
    extras = _write_unlabelled(
        out_dir, studies[0], folders[0], np.random.default_rng([seed, 3]), uid_rng, phi, dates
    )
    labels_csv = out_dir / "labels.csv"
    with labels_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "mask", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return DemoSummary(
        root=out_dir, labels_csv=labels_csv, n_patients=len(people), n_studies=len(studies),
        n_radiographs=sum(s.kind == "xr" for s in studies), n_ct_series=sum(s.kind == "ct" for s in studies),
        phi_strings=frozenset(phi), phi_dates=frozenset(dates), planted_gap=PLANTED_GAP,
        gap_institution=SITES[GAP_SITE].name, unlabelled_files=extras,
    )


# --- planning -------------------------------------------------------------------------------


def _quota(rng: np.random.Generator, n: int, shares: list[float]) -> np.ndarray:
    """Exact group sizes from shares, shuffled: random draws could starve a small group."""
    counts = np.floor(np.asarray(shares) / sum(shares) * n).astype(int)
    counts[np.argsort(-np.asarray(shares))[: n - counts.sum()]] += 1
    return rng.permutation(np.repeat(np.arange(len(shares)), counts))


def _plan_patients(rng: np.random.Generator, n: int) -> list[_Patient]:
    sites = _quota(rng, n, [s.share for s in SITES])
    sexes = _quota(rng, n, [0.5, 0.5])
    decades = _quota(rng, n, [0.1] * 10)  # 0-9 ... 90-99: every age band, 90+ included
    mrn_numbers = rng.choice(9_000_000, size=n, replace=False) + 1_000_000
    people = []
    for i in range(n):
        sex = "FM"[sexes[i]]
        first = rng.choice(_FEMALE if sex == "F" else _MALE)
        age = int(decades[i] * 10 + rng.integers(0, 10))
        if decades[i] == 0 and rng.random() < 0.25:  # infants, whose PatientAge is in months
            age = 0
        mrn = f"{SITES[sites[i]].code}{mrn_numbers[i]}"
        last = str(rng.choice(_LAST))
        people.append(_Patient(i, mrn, last, str(first), sex, age, int(sites[i]),
                               age_tag=bool(rng.random() < 0.8), named_paths=bool(rng.random() < 0.4)))
    return people


def _plan_studies(rng: np.random.Generator, people: list[_Patient]) -> list[_StudyPlan]:
    n = len(people)
    two_xr = set(rng.permutation(n)[: round(0.2 * n)].tolist())
    with_ct = set(rng.permutation(n)[: max(1, round(n / 8))].tolist())
    kinds: list[tuple[_Patient, str, int]] = []
    for p in people:
        kinds.append((p, "xr", 0))
        if p.index in two_xr:
            kinds.append((p, "xr", 1))
        if p.index in with_ct:
            kinds.append((p, "ct", 2))
    n_xr = sum(k == "xr" for _, k, _ in kinds)
    xr_labels = iter(rng.permutation(np.arange(n_xr) % 2))
    ct_labels = iter(rng.permutation(np.arange(len(with_ct)) % 2))
    studies = []
    births: dict[int, dt.date] = {}
    first_dates: dict[int, dt.date] = {}
    for index, (p, kind, order) in enumerate(kinds):
        if order == 0:
            first_dates[p.index] = dt.date(2015, 1, 1) + dt.timedelta(days=int(rng.integers(0, 8 * 365)))
            births[p.index] = _birth_for_age(rng, p.age, first_dates[p.index])
            date = first_dates[p.index]
        else:
            date = first_dates[p.index] + dt.timedelta(days=int(rng.integers(20, 700)))
        label = next(xr_labels) if kind == "xr" else next(ct_labels)
        accession = f"{SITES[p.site].code}A{rng.integers(10**7, 10**8)}"
        studies.append(_StudyPlan(index, p, kind, date, births[p.index], accession, int(label)))
    return studies


def _birth_for_age(rng: np.random.Generator, age: int, on: dt.date) -> dt.date:
    """A birth date that makes the patient exactly `age` full years old on `on`."""
    if age == 0:  # infants: several months old, written as "nnnM"
        return on - dt.timedelta(days=int(rng.integers(40, 330)))
    birth = dt.date(on.year - age, int(rng.integers(1, 13)), int(rng.integers(1, 29)))
    if (birth.month, birth.day) > (on.month, on.day):
        birth = birth.replace(year=birth.year - 1)
    return birth


def _age_string(birth: dt.date, on: dt.date) -> str:
    """DICOM AS value ("045Y", or "007M" under one year)."""
    before = (on.month, on.day) < (birth.month, birth.day)
    years = on.year - birth.year - before
    if years >= 1:
        return f"{years:03d}Y"
    months = (on.year - birth.year) * 12 + on.month - birth.month - (on.day < birth.day)
    return f"{max(months, 1):03d}M"


def _da(day: dt.date) -> str:
    return day.strftime("%Y%m%d")


def _study_folder(study: _StudyPlan, used: dict[str, int]) -> Path:
    """Named folders for some patients ("DOE_JANE_19570312/20190312_<accession>"), clean for others."""
    p = study.patient
    if p.named_paths:
        name = f"{p.last}_{p.first}_{_da(study.birth)}"
        if used.setdefault(name, p.index) != p.index:  # a namesake born the same day
            name = f"{name}_{p.mrn}"
        return Path(name) / f"{_da(study.date)}_{study.accession}"
    return Path(f"study_{study.index + 1:04d}")


# --- identifying values ---------------------------------------------------------------------


def _site_phi() -> list[str]:
    out = []
    for s in SITES:
        out += [s.name, s.address, s.ct_scanner[2], *s.physicians, *s.operators, *(c[3] for c in s.scanners)]
    return out


def _patient_phi(p: _Patient, birth: dt.date) -> list[str]:
    return [f"{p.last}^{p.first}", f"{p.first} {p.last}", f"{p.last}_{p.first}", p.mrn, birth.isoformat()]


def _uid(rng: np.random.Generator) -> str:
    """A UID under the 2.25 root (PS3.5 B.2), drawn from the seeded generator for reproducibility."""
    return f"2.25.{int.from_bytes(rng.bytes(16), 'big')}"


def _base_dataset(study: _StudyPlan, rng: np.random.Generator, modality: str, sop_class: str,
                  scanner: tuple[str, str, str], study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
    """Patient, study, series and equipment modules with fake identifying values and free text."""
    p, site = study.patient, SITES[study.patient.site]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = _da(study.date)
    time = f"{rng.integers(7, 20):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.AccessionNumber = study.accession
    ds.Modality = modality
    ds.Manufacturer, ds.ManufacturerModelName, ds.StationName = scanner
    ds.InstitutionName, ds.InstitutionAddress = site.name, site.address
    ds.ReferringPhysicianName = site.physicians[int(rng.integers(len(site.physicians)))]
    ds.OperatorsName = site.operators[int(rng.integers(len(site.operators)))]
    ds.PatientName = f"{p.last}^{p.first}"
    ds.PatientID = p.mrn
    ds.PatientBirthDate = _da(study.birth)
    ds.PatientSex = p.sex
    if p.age_tag:
        ds.PatientAge = _age_string(study.birth, study.date)
    ds.StudyID = "1"
    ds.SeriesNumber = 1 if modality != "SR" else 900
    if rng.random() < 0.5:  # free text with identifiers, as technologists type it
        kind = "CT ABDOMEN" if modality == "CT" else "CXR"
        ds.StudyDescription = f"{kind} for {p.first} {p.last} MRN {p.mrn}"
        ds.ImageComments = f"Pt {p.first} {p.last}, DOB {study.birth.isoformat()}, acc {study.accession}"
    else:
        ds.StudyDescription = "XR CHEST" if modality != "CT" else "CT ABDOMEN W CONTRAST"
    block = ds.private_block(0x0011, "ACME_PACS", create=True)
    block.add_new(0x01, "LO", f"MRN {p.mrn}")
    block.add_new(0x02, "LO", f"{p.last}^{p.first} {study.accession}")
    return ds


# --- radiographs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Opacity:
    """How a finding, its mimics and the noise look on one kind of film (ranges sampled uniformly)."""

    amplitude: tuple[float, float]  # added attenuation at the blob centre (lung field is ~0.25)
    sigma_px: tuple[float, float]  # Gaussian width in pixels of the 128 px image
    white_noise: float
    mottle: float  # std of spatially correlated noise (sigma 2 px)
    mimics: tuple[float, ...] = (1.0,)  # probability of 0, 1, 2, ... opacity-like blobs in any image


FIXED_ROOM = _Opacity(amplitude=(0.15, 0.25), sigma_px=(5.0, 8.5), white_noise=0.012, mottle=0.0)
# Bedside films: electrodes, lines and skin folds over the lungs look like small opacities
# (same size and contrast as the finding, in either class) and the finding itself is fainter.
PORTABLE = _Opacity(amplitude=(0.05, 0.10), sigma_px=(3.0, 5.5), white_noise=0.02, mottle=0.006,
                    mimics=(0.3, 0.4, 0.3))


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, ax: float, ay: float, power: float = 2.0,
          edge: float = 0.04) -> np.ndarray:
    """Soft-edged filled (super)ellipse in [0, 1]; power > 2 gives a boxier shape."""
    r = (np.abs((x - cx) / ax) ** power + np.abs((y - cy) / ay) ** power) ** (1 / power)
    return 1.0 / (1.0 + np.exp((r - 1.0) / edge))


def _band(x: np.ndarray, y: np.ndarray, p0: tuple[float, float], p1: tuple[float, float],
          width: float) -> np.ndarray:
    """Gaussian profile around the segment p0-p1 (a clavicle)."""
    d = np.subtract(p1, p0)
    t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / (d @ d), 0, 1)
    dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2
    return np.exp(-dist2 / (2 * width**2))


def chest_attenuation(rng: np.random.Generator, *, finding: bool, portable: bool) -> np.ndarray:
    """A 128x128 chest-like attenuation map in [0, 1] (brighter = more attenuating), rows x cols.

    PA orientation: the patient's right lung on the image's left. A finding is a blurred
    bright blob ("opacity") inside one lung field; on portable films it is fainter and smaller
    and the image noisier, which is the planted subgroup gap (`PORTABLE` vs `FIXED_ROOM`).
    """
    y, x = np.mgrid[0:XR_SIZE, 0:XR_SIZE] / XR_SIZE
    s = rng.uniform(0.92, 1.05)
    cx, cy = 0.5 + rng.normal(0, 0.015), 0.52 + rng.normal(0, 0.015)
    body = _blob(x, y, cx, cy + 0.05, 0.46 * s, 0.56, power=3.0, edge=0.03)
    fields = [(cx - 0.18 * s, cy - 0.02, 0.13 * s, 0.3), (cx + 0.17 * s, cy, 0.12 * s, 0.29)]
    lung = np.zeros_like(x)
    for lx, ly, ax, ay in fields:
        dome = ly + 0.2 - 2.0 * (x - lx) ** 2  # diaphragm: lungs end in a dome
        lung = np.maximum(lung, _blob(x, y, lx, ly, ax, ay) / (1 + np.exp((y - dome) / 0.012)))
    lung /= 1 + np.exp((0.045 - np.abs(x - cx)) / 0.008)  # the mediastinum between the lungs
    heart = _blob(x, y, cx + 0.06 * s, cy + 0.16, 0.14 * s, 0.12)
    lung *= 1 - heart
    spine = _blob(x, y, cx, cy, 0.03, 0.6, edge=0.1)
    trachea = _blob(x, y, cx, cy - 0.33, 0.014, 0.14, edge=0.15)
    clavicles = sum(_band(x, y, (cx + k * 0.05, cy - 0.33), (cx + k * 0.3, cy - 0.39), 0.012)
                    for k in (-1, 1))
    # Ribs: bands across the lung fields, curving down laterally, with a per-image phase and pitch.
    phase, pitch = rng.uniform(0, 2 * np.pi), rng.uniform(8.0, 10.0)
    ribs = (0.5 + 0.5 * np.sin(2 * np.pi * pitch * (y - 0.8 * (x - cx) ** 2) + phase)) ** 4
    img = 0.04 + body * (0.5 + 0.04 * (1 - y) + 0.12 * spine - 0.1 * trachea + 0.1 * clavicles)
    img += lung * (0.05 * ribs - rng.uniform(0.26, 0.32))
    look = PORTABLE if portable else FIXED_ROOM
    n_blobs = int(rng.choice(len(look.mimics), p=look.mimics)) + finding
    for _ in range(n_blobs):
        fx, fy = _lung_point(rng, fields, lung)
        amp, sigma = rng.uniform(*look.amplitude), rng.uniform(*look.sigma_px)
        img += amp * np.exp(-(((x - fx) ** 2 + (y - fy) ** 2) * XR_SIZE**2) / (2 * sigma**2))
    noise = rng.normal(0, look.white_noise, img.shape)
    if look.mottle:
        # Gaussian blur of white noise with sigma 2 px keeps 1/(4*sqrt(pi)) of its std.
        noise += gaussian(rng.normal(0, look.mottle * 4 * np.sqrt(np.pi), img.shape), sigma=2.0)
    return np.clip(img + noise, 0.0, 1.0)


def _lung_point(rng: np.random.Generator, fields: list[tuple[float, float, float, float]],
                lung: np.ndarray) -> tuple[float, float]:
    """A point well inside a lung field, not behind the heart (x, y as fractions of the image)."""
    for _ in range(50):
        lx, ly, ax, ay = fields[int(rng.integers(len(fields)))]
        ang, rad = rng.uniform(0, 2 * np.pi), 0.7 * np.sqrt(rng.uniform(0, 1))
        fx, fy = lx + rad * ax * np.cos(ang), ly + rad * ay * np.sin(ang)
        if lung[int(fy * XR_SIZE), int(fx * XR_SIZE)] > 0.9:
            break
    return fx, fy


def _write_radiograph(root: Path, folder: Path, study_uid: str, study: _StudyPlan, rng: np.random.Generator,
                      uid_rng: np.random.Generator, phi: set[str]) -> dict[str, str]:
    p, site = study.patient, SITES[study.patient.site]
    manufacturer, model, modality, station = site.scanners[int(rng.integers(len(site.scanners)))]
    series_uid, sop_uid = _uid(uid_rng), _uid(uid_rng)
    phi.update({series_uid, sop_uid})
    sop_class = DigitalXRayImageStorageForPresentation
    if modality == "CR":
        sop_class = ComputedRadiographyImageStorage
    scanner = (manufacturer, model, station)
    ds = _base_dataset(study, rng, modality, sop_class, scanner, study_uid, series_uid, sop_uid)
    portable = p.site == GAP_SITE
    values = chest_attenuation(rng, finding=bool(study.label), portable=portable)
    values = values * rng.uniform(3000, 3700) + rng.uniform(100, 300)  # detector gain and offset
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP" if portable else "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.SeriesDescription = f"CHEST {ds.ViewPosition}"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.InstanceNumber = 1
    ds.KVP = 90 if portable else 120
    ds.PixelSpacing = ds.ImagerPixelSpacing = [XR_SPACING_MM, XR_SPACING_MM]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    slope, intercept = (1.0, 0.0)
    if rng.random() < 0.3:
        slope, intercept = [(2.0, -1024.0), (0.5, 50.0)][int(rng.integers(2))]
    if modality == "DX" or (slope, intercept) != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    stored = np.clip(np.rint((values - intercept) / slope), 0, None).astype(np.uint16)
    bits = max(12, int(stored.max()).bit_length())
    monochrome1 = rng.random() < 0.2
    if monochrome1:  # stored inverted: high stored value = low attenuation
        stored = ((1 << bits) - 1 - stored).astype(np.uint16)
    if rng.random() < 0.5:
        shown = stored * slope + intercept
        lo, hi = np.percentile(shown, [0.5, 99.9])
        ds.WindowCenter, ds.WindowWidth = round(float(lo + hi) / 2, 1), round(float(hi - lo) * 1.1, 1)
    _set_pixels(ds, stored, bits, "MONOCHROME1" if monochrome1 else "MONOCHROME2")
    syntax = rng.random()
    if syntax < 0.15:
        ds.compress(RLELossless, stored, generate_instance_uid=False)
    elif syntax < 0.3:
        ds.compress(JPEG2000Lossless, stored, generate_instance_uid=False)
    name = f"{modality}_{p.mrn}.dcm" if p.named_paths else "image.dcm"
    _save(ds, root / folder / name)
    return {"path": (folder / name).as_posix(), "label": str(study.label), "mask": "", "patient_id": p.mrn}


def _set_pixels(ds: Dataset, stored: np.ndarray, bits: int, photometric: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.PixelData = stored.astype("<u2").tobytes()


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


# --- CT -------------------------------------------------------------------------------------


def ct_affine(iop: list[float], first_ipp: list[float], n_slices: int) -> np.ndarray:
    """Voxel->RAS affine of a stack ordered by position along the slice normal (cols, rows, slices).

    Voxel (i, j, k) is column i, row j of the k-th slice; in LPS it sits at
    IPP_0 + i*dc*row_cosine + j*dr*col_cosine + k*dz*normal (DICOM PS3.3 C.7.6.2.1.1), and the
    LPS->RAS flip negates x and y.
    """
    row_cos, col_cos = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    lps = np.eye(4)
    lps[:3, 0] = row_cos * CT_PIXEL_MM
    lps[:3, 1] = col_cos * CT_PIXEL_MM
    lps[:3, 2] = np.cross(row_cos, col_cos) * (CT_SLICE_MM if n_slices > 1 else 1.0)
    lps[:3, 3] = first_ipp
    return LPS_TO_RAS @ lps


def _ct_volume(rng: np.random.Generator, lps: np.ndarray, shape: tuple[int, int, int],
               lesion: bool) -> tuple[np.ndarray, np.ndarray]:
    """HU volume and label map (cols, rows, slices) of a body with an off-centre organ and lesion.

    The organ sits to the patient's right, front and above the middle (all in LPS mm), so a
    flipped axis in a loader or mask shows up as misalignment.
    """
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in shape), indexing="ij"), axis=-1).astype(float)
    world = idx @ (lps[:3, :3].T) + lps[:3, 3]  # LPS mm of every voxel centre
    centre = lps[:3, :3] @ ((np.asarray(shape) - 1) / 2) + lps[:3, 3]
    rel = world - centre
    body = (rel[..., 0] / 17.5) ** 2 + (rel[..., 1] / 14.5) ** 2 <= 1
    org_c = np.array([-4.0, -2.0, 3.0]) + rng.normal(0, 0.7, 3)
    org_ax = np.array([10.0, 8.0, 11.0]) * rng.uniform(0.9, 1.1, 3)
    organ = (((rel - org_c) / org_ax) ** 2).sum(-1) <= 1
    labels = organ.astype(np.uint8)
    hu = np.where(body, rng.uniform(-20, 10), -1000.0) + rng.normal(0, 10, shape)
    hu[organ] += 60 - hu[organ].mean() + rng.normal(0, 3)
    if lesion:
        off = rng.uniform(-0.35, 0.35, 3) * org_ax
        radius = rng.uniform(2.4, 3.6)
        les = organ & (np.linalg.norm(rel - org_c - off, axis=-1) <= radius)
        labels[les] = 2
        hu[les] -= 45
    return hu, labels


def _write_ct(root: Path, folder: Path, study_uid: str, study: _StudyPlan, rng: np.random.Generator,
              uid_rng: np.random.Generator, phi: set[str]) -> dict[str, str]:
    p, site = study.patient, SITES[study.patient.site]
    n = int(rng.integers(12, 17))
    head_first = rng.random() < 0.5
    iop = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0] if head_first else [-1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    normal = np.cross(iop[:3], iop[3:])
    half = (CT_SIZE - 1) / 2 * CT_PIXEL_MM
    # The volume's centre sits on the scanner axis, some 30-40 cm below the reference point.
    first_ipp = -np.asarray(iop[:3]) * half - np.asarray(iop[3:]) * half + [0.0, 0.0, rng.uniform(-400, -300)]
    affine = ct_affine(iop, first_ipp.tolist(), n)
    lps = LPS_TO_RAS @ affine  # the flip is its own inverse
    hu, labels = _ct_volume(rng, lps, (CT_SIZE, CT_SIZE, n), bool(study.label))
    series_uid, frame_uid = _uid(uid_rng), _uid(uid_rng)
    phi.update({series_uid, frame_uid})
    series_dir = folder / (f"CT_{p.mrn}" if p.named_paths else "series_1")
    stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)
    for k in range(n):
        sop_uid = _uid(uid_rng)
        phi.add(sop_uid)
        ds = _base_dataset(study, rng, "CT", CTImageStorage, site.ct_scanner, study_uid, series_uid, sop_uid)
        ds.SeriesDescription = "AXIAL 2.5mm"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "ABDOMEN"
        ds.PatientPosition = "HFS" if head_first else "FFS"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_uid, ""
        ds.KVP, ds.SliceThickness = 120, CT_SLICE_MM
        ipp = first_ipp + k * CT_SLICE_MM * normal
        ds.ImagePositionPatient = [round(float(v), 4) for v in ipp]
        ds.ImageOrientationPatient = iop
        ds.SliceLocation = round(float(ipp[2]), 4)
        ds.InstanceNumber = k + 1  # agrees with position order, so either sort key gives one stack
        ds.PixelSpacing = [CT_PIXEL_MM, CT_PIXEL_MM]
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024.0, 1.0, "HU"
        ds.WindowCenter, ds.WindowWidth = 40.0, 400.0
        _set_pixels(ds, stored[:, :, k].T, 12, "MONOCHROME2")  # (cols, rows) -> DICOM rows x cols
        name = f"{sop_uid}.dcm" if p.named_paths else f"{rng.bytes(6).hex()}.dcm"
        _save(ds, root / series_dir / name)
    mask = Path("masks") / (f"{p.last}_{p.first}_{p.mrn}_seg.nii.gz" if p.named_paths
                            else f"study_{study.index + 1:04d}_seg.nii.gz")
    (root / "masks").mkdir(exist_ok=True)
    img = nib.Nifti1Image(labels, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, root / mask)
    row = {"path": series_dir.as_posix(), "label": str(study.label), "mask": mask.as_posix()}
    return {**row, "patient_id": p.mrn}


# --- files that are not training images -----------------------------------------------------


def _write_unlabelled(root: Path, first: _StudyPlan, first_folder: tuple[Path, str], rng: np.random.Generator,
                      uid_rng: np.random.Generator, phi: set[str], dates: set[str]) -> tuple[Path, ...]:
    """A Basic Text SR beside the first study, a truncated radiograph and a stray text file."""
    folder, study_uid = first_folder
    sr_rel = folder / "report.dcm"
    series_uid, sop_uid = _uid(uid_rng), _uid(uid_rng)
    phi.update({series_uid, sop_uid})
    scanner = ("ACME", "ReportWriter 2", "RIS-01")
    phi.add("RIS-01")
    ds = _base_dataset(first, rng, "SR", BasicTextSRStorage, scanner, study_uid, series_uid, sop_uid)
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
    ds.InstanceNumber = 1
    ds.ConceptNameCodeSequence = Sequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
    p = first.patient
    item.TextValue = f"Chest film of {p.first} {p.last} ({p.mrn}) reviewed; see images."
    ds.ContentSequence = Sequence([item])
    _save(ds, root / sr_rel)

    # A fake patient of its own, so the broken file duplicates no labelled UID.
    # Generated MRNs never start with 0, so this one is unique.
    ghost = _Patient(-1, "NGH0999001", "WINTERBOTTOM", "GRETA", "F", 61, 0, age_tag=True, named_paths=False)
    ghost_study = _StudyPlan(-1, ghost, "xr", dt.date(2021, 5, 4), dt.date(1960, 2, 14), "NGHA99990001", 0)
    ghost_uid = _uid(uid_rng)
    phi.update(_patient_phi(ghost, ghost_study.birth) + [ghost_study.accession, ghost_uid])
    dates.update({_da(ghost_study.birth), _da(ghost_study.date)})
    _write_radiograph(root, Path("incoming"), ghost_uid, ghost_study, rng, uid_rng, phi)
    full = root / "incoming" / "image.dcm"
    data = full.read_bytes()
    full.unlink()
    broken = root / "incoming" / "partial_transfer.dcm"
    broken.write_bytes(data[: int(len(data) * 0.6)])  # cut inside the pixel data, as an aborted transfer

    notes = root / "notes.txt"
    notes.write_text(f"Research export, batch 1. Questions to the PACS team ({SITES[0].operators[0]}).\n")
    return sr_rel, broken.relative_to(root), notes.relative_to(root)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item
