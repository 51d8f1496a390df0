"""The one list of words medtl treats as generic: never identifying alone, never aliased in paths.

A leaf module every layer may import (like `medtl.errors`). Two questions are answered here, with
the same words, so that path aliasing (data layer), the manifest's PHI gate and the MLflow guard
(tracking layer) never disagree:

- `generic_component`: may a path component be written in clear? Only when every token of it is
  generic: a split or class name, an imaging or file-format word, a short number (up to 5 digits),
  a hex/UUID token, or a single letter. Names, long numbers (IDs), dates in any order and
  e-mail addresses are not, so the path is aliased. This is an allow-list: a path component we
  cannot vouch for is aliased, never guessed to be harmless.
- `generic_value`: is a header value (or a part of one) too generic to identify anyone, so that
  finding it in an output is no leak? Placeholders ("ANONYMOUS", "TEST^PATIENT"), medtl's own
  vocabulary ("series", "train", "quarantined"), imaging words ("CHEST"), the run's own class
  names, and single common English words are generic. A value with a digit, or with two or more
  words one of which is neither medtl vocabulary nor a placeholder (a person's full name,
  "General Hospital"), still identifies.

Common English words come from the `english-words` package (Webster's Second, public domain),
lower-case entries only: proper names are capitalised there, so "john" or "garcia" stay needles.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

# What de-identification tools, test files, phantoms and scanners write instead of a person.
PLACEHOLDER_WORDS = frozenset(
    """anonymous anonymized anonymised anonymize anon anonym deidentified deid redacted removed
    unknown none null nil empty blank na n/a not applicable test tests testing patient patients
    name names first last given family middle surname forename subject subjects participant case
    cases person volunteer phantom demo sample samples example examples dummy fake synthetic
    research study default generic mr mrs ms dr prof""".split()
)

# Words of split names, imaging, anatomy, views, MR sequences and file handling: what public
# exports and research folders are named with.
GENERIC_PATH_WORDS = frozenset(
    """train training val valid validation dev tune test testing holdout eval evaluation split
    splits fold folds subset all set sets part parts batch batches
    image images img imgs im ims scan scans slice slices series study studies volume volumes vol
    frame frames data dataset datasets raw processed preprocessed resampled cropped crop crops
    resized original orig export exports exported output outputs input inputs out in src
    mask masks label labels labelled labeled unlabelled unlabeled seg segs segmentation segmentations gt ground truth
    annotation annotations roi rois pred preds prediction predictions prob probs map maps
    dicom dcm dicm dic ima nifti nii gz png jpg jpeg tif tiff bmp nrrd mha mhd npy npz h5
    file files folder folders dir directory root home tmp temp copy final new old clean cleaned
    version rev idx index num no nr number id ids uid key
    patient patients subject subjects sub ses session sessions run runs case cases person
    sample samples example examples demo synthetic phantom anon anonymized anonymised deid
    deidentified site sites centre center centers centres scanner scanners hospital clinic
    ct mr mri cr dx xr xray xrays radiograph radiographs radiography cxr us ultrasound pet pt nm
    mg mammo mammogram mammography spect fluoro angio oct fundus ot sc seg rtstruct sr pr
    chest thorax lung lungs heart cardiac brain head neck abdomen abdominal pelvis spine knee hip
    hand wrist foot ankle shoulder elbow breast liver kidney kidneys prostate hippocampus skull
    sinus colon pancreas spleen bone bones body whole wholebody tumor tumour lesion lesions nodule
    nodules organ organs vessel vessels
    pa ap lat lateral frontal axial ax sagittal sag coronal cor oblique left right bilateral lt rt
    t1 t2 t1w t2w flair dwi adc pd swi bold dti gre tse mprage stir post pre contrast ce gd
    normal abnormal positive negative pos neg benign malignant healthy disease control controls
    pneumonia bacteria bacterial virus viral covid effusion nofinding finding findings
    fold cv kfold rgb gray grey mono color colour low high res resolution small large
    mm cm um kv kvp mas ms sec deg
    zero one two three four five six seven eight nine ten first second third fourth fifth
    readme notes note info meta metadata log logs misc other others extra extras bad good corrupt corrupted
    truncated empty broken
    excluded exclude included include qc failed pass ok done backup archive archives cache list table
    report reports summary anat func fmap dwi derivatives sourcedata
    imaging imagestr labelstr imagests labelsts task tasks view views acq desc rec echo stage phase
    fmriprep freesurfer nnunet decathlon msd kaggle challenge public private
    brats kits lits lidc idri isic oasis oas chexpert mimic nih rsna luna amos tcia tcga adni ixi abide hcp
    fastmri medmnist totalsegmentator t1ce t1gd t2f t1n flair
    txt csv tsv json jsonl xml yaml yml md rst html htm ini cfg toml dump pdf doc docx xls xlsx odt ods
    sha md5 zip tar tgz bz2 xz 7z mgz mnc hdr nhdr zarr hdf5 mat pkl pt pth ckpt gif webp""".split()
)

# medtl's own words that no English dictionary lists (inflections are handled by `common_word`).
MEDTL_WORDS = frozenset(
    """medtl manifest manifests sidecar sidecars pseudonym pseudonyms pseudonymous alias aliases
    aliased quarantined quarantine unlabelled unlabeled unaccounted dicom nifti nii png jpeg jpg
    tiff bmp dcm csv json yaml yml html css svg pdf txt mlflow mlruns monai pydicom nibabel timm
    sqlalchemy sqlite sqlite3 alembic dcmtk endian
    torch torchvision torchrun pytorch sklearn fairlearn numpy pandas auroc auprc ece brier dice
    hausdorff youden bonferroni imagenet medicalnet efficientnet resnet densenet unet lite
    finetune finetuning adabn dann lp ft probe prototype fewshot ddp gloo nccl cuda cpu gpu amp
    bf16 fp16 epoch epochs checkpoint checkpoints config configs workflow workflows param params
    tag tags registry champion candidate dataset datasets metadata subgroup subgroups
    k-anonymity anonymity hmac sha256 sha uid uids rgb ybr monochrome lut voi hu ct mr cr dx
    modality modalities voxel voxels spacing spacings affine ras lps bootstrap bootstrapped
    auditable audited audit audits inconclusive suppressed suppression amplification
    calibration recalibration tpr fpr fnr tnr ppv npv sensitivity specificity
    adamw addr argmax baseline box bsd bytes cda charset chmod chs cis classify cls com conv cublas
    dannmodel dataclass deidentification denseblock denselayer dhw dicomdir dict dicts doctype downsample
    dseg ecg eeg embeddings emg emsp encoders env eps ethnicity figcaption filesystem fontsize frameon gaussian
    getaffinity github google grl has hdf held hexadecimal href huggingface hyperparameters incl inf init
    initialisation initialisations initialised inplace iqr labelsize lang licence linewidth logits lutdata
    lutdescriptor max maxpool med mit mlmodel mod multi multilabel multitask nav niix nonbinary nproc nvimgcodec
    offline omp online ovr pilreader pixel pixels plugin posix preprocessing quic relu rerender rgba rng rtimage
    safetensors sched scikit scn sgd shortcut signoff softmax sqlite str summarise tbody tencent thead titlesize
    toplevel tuple urandom uri utc utf var vermillion viewport voilutsequence warmup waveform whitespace
    workspace ymwdymwd zscore backend debug stderr stdout traceback tracebacks venv byte spreadsheet
    surrogateescape underdiagnosis ctx int keyword loc neighbouring highdicom pyfunc tvd smd psi std stats
    quantiles numeric preprocess mappings download backslashes ema tta labelmap roiname dicomweb http https
    netrc url benchmarks""".split()
)

# Words of medtl's fixed outputs that person-name checks must know: split names and the nouns of
# its messages ("3 labels CSV rows were not used"), so "SPLIT^TRAIN" is no one's name.
MEDTL_WORDS = MEDTL_WORDS | frozenset(
    """train val test split splits label labels row rows file files image images mask masks class classes
    patient patients study studies series column columns field fields group groups count counts used
    skipped kind site scanner sex age band""".split()
)

# The audit's verdicts: evaluation writes them, tracking records them on registered versions.
AUDIT_STATUSES = ("passed", "failed", "inconclusive")

# Closed vocabularies of the workflow config, one source each: the config validates with them,
# the layers that act on them import them, the docs list them (a test keeps all in sync).
TASKS = ("classification", "segmentation")
STRATEGIES = ("linear_probe", "finetune", "gradual_unfreeze", "lp_ft", "discriminative")
THRESHOLD_RULES = ("youden", "sensitivity", "fpr")
#: Test-time augmentation: "flip" averages the outputs of the image and its mirror image along the
#: last spatial axis (left-right in a radiograph: the column axis); "mirror" averages the image and
#: its mirror image along each axis training flipped (`data.flip_axes`).
TTA_MODES = ("none", "flip", "mirror")
FEW_SHOT_METHODS = ("prototype", "linear_probe")
OPTIMIZERS = ("adamw", "sgd")
AMP_MODES = ("auto", "bf16", "fp16", "off")
BALANCE_MODES = ("none", "sampler", "loss")

# Identifiers made only of digits: from this many digits a value is an ID (aliased in paths, a
# needle); outputs are scanned for such IDs from `MIN_SCANNED_DIGITS` digits on, since shorter
# numbers are everywhere in them (counts, sizes, "1024x1024").
MIN_ID_DIGITS = 4
MIN_SCANNED_DIGITS = 5

# Short function words that, inside a longer value, say nothing about anyone.
_STOP_WORDS = frozenset("a an and at by de del der di du for in la le of on or the to van von w wo with".split())

# A hash-like token (content hashes, Kaggle/ISIC-style ids): 12+ hex characters mixing letters and
# digits, without a run of 6+ digits (a run that long is a date or an ID inside letters:
# "E1234567", "abe19570722").
_HEX = re.compile(r"(?<![0-9a-z])(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])(?![0-9a-f]*\d{6})[0-9a-f]{12,}(?![0-9a-z])")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_TOKEN = re.compile(r"[^\W\d_]+|\d+")
_SEPARATORS = re.compile(r"[\W_]+")
_DENSE_SCRIPTS = 0x2E80  # CJK radicals, kana, hangul and the CJK ideographs lie above
# A person-name-shaped token inside any text: words joined by "^" (DICOM PN), e.g. "DOE^JANE".
CARETED = re.compile(r"[^\s^=]+(?:[\^=][^\s^=]*)+")
# Three numbers in a row (12-25-1957, 1957.3.9, 25_12_57): a date in some order.
_THREE_NUMBERS = re.compile(r"(?<!\d)(\d{1,4})[-_. /,]+(\d{1,2})[-_. /,]+(\d{1,4})(?!\d)")
_YEAR_MONTH = re.compile(
    r"(?<!\d)(?:(?:19|20)\d\d[-_. /]+(?:0?[1-9]|1[0-2])|(?:0?[1-9]|1[0-2])[-_. /]+(?:19|20)\d\d)(?!\d)")
# Case-sensitive, so the modality in "MR BRAIN" is no title.
_TITLED_NAME = re.compile(r"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof|Sir|Herr|Frau|Sr|Sra|Mme|Mlle)\b\.?\s+[A-ZÀ-Þ][^\W\d_]+")
# Two single letters in a row ("J.D", "j_d_0042", "J. D"): a person's initials.
_INITIALS = re.compile(r"(?<![^\W\d_])[^\W\d_][\W_]+[^\W\d_](?![^\W\d_])")
# Two numbers of 1-2 digits ("12-25", "25.12"), not glued to letters ("3.5mm", "v1.2" are no dates).
_TWO_NUMBERS = re.compile(r"(?<![^\W_])(?<![.\-/])(\d{1,2})[-./](\d{1,2})(?![^\W_]|[-./]\d)")
_DIGIT_GROUPS = re.compile(r"\d+(?:[-_. /()+,]+\d+){2,}")
_MAX_TEXT_DIGITS = 4  # numbers in a description ("Lung 1.25mm", "T1 3D"); longer ones are IDs or dates
_MAX_GENERIC_DIGITS = 5  # file counters (train_00001); six or more digits are read as IDs


@functools.cache
def _english() -> frozenset[str]:
    from english_words import get_english_words_set

    return frozenset(w for w in get_english_words_set(["web2"]) if w.islower() and len(w) >= 3)


def long_enough(text: str) -> bool:
    """Long enough to identify: 3+ characters, or 2+ in scripts written with few characters per
    name (Chinese, Japanese, Korean: "山田", "小明"); shorter values ("M", "CT") match anything."""
    return len(text) >= 3 or (len(text) == 2 and any(ord(c) >= _DENSE_SCRIPTS for c in text))


def normalise(text: str) -> str:
    """Case-folded, every run of separators (space, punctuation, "_", "^") as one space.

    Identifying values and the outputs searched for them are both normalised, so "DOE^JANE",
    "Doe, Jane" and "doe_jane" meet, and so do "2019-07-22" and "2019.07.22".

    Example:
        >>> normalise("DOE^JANE"), normalise("Doe, Jane"), normalise("2019.07.22")
        ('doe jane', 'doe jane', '2019 07 22')
    """
    return _SEPARATORS.sub(" ", str(text).casefold()).strip()


def words_of(text: str) -> list[str]:
    """Case-folded runs of letters and runs of digits, e.g. "T1w_0001" -> ["t", "1", "w", "0001"]."""
    return _TOKEN.findall(str(text).casefold())


def common_word(word: str) -> bool:
    """True for a word medtl may meet anywhere without it naming anyone.

    Placeholders, medtl's vocabulary, imaging words and lower-case English dictionary words,
    also inflected (plural, past, -ing), are common; "john", "garcia" or "mueller" are not.

    Example:
        >>> common_word("Patients"), common_word("quarantined"), common_word("garcia")
        (True, True, False)
    """
    word = str(word).strip().casefold()
    if word in PLACEHOLDER_WORDS or word in MEDTL_WORDS or word in GENERIC_PATH_WORDS:
        return True
    english = _english()
    return any(stem in english for stem in _stems(word))


def _stems(word: str) -> Iterable[str]:
    """The word and the bases it may be inflected from (files -> file, dropped -> drop, largest -> large)."""
    yield word
    for suffix, replacement in (("ies", "y"), ("ied", "y"), ("es", ""), ("s", ""), ("ed", ""), ("ed", "e"),
                                ("ing", ""), ("ing", "e"), ("ly", ""), ("er", ""), ("er", "e"), ("ers", ""),
                                ("est", ""), ("est", "e")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            base = word[: -len(suffix)]
            yield base + replacement
            if suffix in ("ed", "ing", "er", "est") and len(base) >= 4 and base[-1] == base[-2]:
                yield base[:-1]  # dropped -> drop, mapping -> map, bigger -> big


def generic_value(value: str, allowed: Iterable[str] = (), *, kind: str = "text") -> bool:
    """True when a header value (or a part of one) cannot identify anyone on its own.

    Args:
        value: The value, e.g. a PatientName, a name component or a description.
        allowed: Whole values the outputs hold by design (the class names).
        kind: What the value is. "person": a person's name (DICOM PN, a "^"-joined token, a
            name-like patient_id): several words are generic only when every one is a
            placeholder or a word of medtl's own ("TEST^PATIENT", "SPLIT^TRAIN"); "GRAY^VAL" or
            "BROWN^ROSE" are names even though each word is common. "name": the name or number of a place, device or record
            (InstitutionName, StationName, IDs): several words are generic only when every one
            is a placeholder, medtl or imaging word, and a digit makes it an identifier. "text":
            a description or comment: a phrase of common words and short numbers is generic
            ("Routine Chest", "Lung 1.25mm").

    Returns:
        True for one of `allowed`, a single common word, or several words that are generic for
        the kind; a date, a long number or a rare word ("Kowalski") is never generic.

    Example:
        >>> generic_value("ANONYMOUS^PATIENT", kind="person"), generic_value("TEST"), generic_value("Routine Chest")
        (True, True, True)
        >>> generic_value("DOE^JANE", kind="person"), generic_value("TEST-001"), generic_value("St Mary", kind="name")
        (False, False, False)
    """
    text = " ".join(str(value).split()).casefold()
    if not text or text in {" ".join(str(a).split()).casefold() for a in allowed}:
        return True
    if text in MEDTL_WORDS or text in GENERIC_PATH_WORDS:
        return True  # also the ones with digits: "sha256", "bf16", "t1w"
    if kind != "person" and any(not generic_value(name, allowed, kind="person") for name in CARETED.findall(text)):
        return False  # a person's name inside other text: "series of DOE^JANE"
    if kind == "text" and _TITLED_NAME.search(str(value)):
        return False  # "Mr Smithers", "Dr. Brown": a title before a capitalised word names a person
    tokens = words_of(text)
    letters = [t for t in tokens if not t.isdigit()]
    digits = [t for t in tokens if t.isdigit()]
    if not tokens:
        return True
    if _date_like(text) or any(len(d) > _MAX_TEXT_DIGITS for d in digits):
        return False
    if kind != "text" and digits and any(len(d) > 2 for d in digits):
        return False  # an identifier such as "TEST-001" or "MRN123"
    if kind == "text" and digits and not _phrase(text, letters) and any(len(d) > 2 for d in digits):
        return False  # digits in a value without spaces: an identifier, whatever its attribute
    if len(letters) == 1:
        return not long_enough(letters[0]) or common_word(letters[0])
    if kind == "person":
        # Not imaging or dictionary words: "GRAY^VAL" and "BROWN^ROSE" are names.
        return all(len(t) == 1 or t in _STOP_WORDS or t in PLACEHOLDER_WORDS or t in MEDTL_WORDS for t in letters)
    if kind == "name":
        return all(len(t) == 1 or t in _STOP_WORDS or t in PLACEHOLDER_WORDS or t in MEDTL_WORDS
                   or t in GENERIC_PATH_WORDS for t in letters)
    # A description ("Routine Chest", "Lung 1.25mm", "CT CHEST W/O CONTRAST"): common words, units.
    return all(len(t) <= 2 or t in _STOP_WORDS or common_word(t) for t in letters)


def _phrase(text: str, letters: list[str]) -> bool:
    """Free text rather than an identifier: words separated by spaces, two of them real words."""
    return " " in text and sum(1 for t in letters if len(t) >= 3) >= 2


def generic_component(component: str, allowed_words: Iterable[str] = ()) -> bool:
    """True when a path component may be written in clear: every token of it is generic.

    Args:
        component: One part of a relative path, e.g. "train_00001.png" or "DOE_JANE".
        allowed_words: More generic words (the words of the labels CSV's class names).

    Returns:
        False for names (any word not on the lists), initials ("J.D"), dates in any order, a
        year and month, numbers of 6+ digits, three or more groups of digits with 7+ digits in
        all (phone numbers, social security numbers), e-mail addresses, and names that are not
        valid text (undecodable bytes, control characters); True when every token is generic.

    Example:
        >>> generic_component("train_00001.png"), generic_component("chest_john_smith.png")
        (True, False)
        >>> generic_component("cxr 12-25-1957.png"), generic_component("sub-01_T1w.nii.gz")
        (False, True)
    """
    text = str(component).casefold()
    if not text.isprintable() or any(0xD800 <= ord(c) <= 0xDFFF for c in text) or "@" in text:
        return False
    text = _HEX.sub(" ", _UUID.sub(" ", text))
    if (_date_like(text) or _YEAR_MONTH.search(text) or _month_day(text) or _INITIALS.search(text)
            or _number_groups(text)):
        return False
    allowed = {w.casefold() for w in allowed_words}
    for token in words_of(text):
        if token.isdigit():
            if len(token) > _MAX_GENERIC_DIGITS:
                return False
        elif len(token) > 1 and token not in GENERIC_PATH_WORDS and token not in allowed:
            return False
    return True


def _month_day(text: str) -> bool:
    """A month and a day without a year ("12-25", "25.12"): a date element of Safe Harbor too."""
    return any(_is_date(2000, a, b) or _is_date(2000, b, a)
               for a, b in ((int(m.group(1)), int(m.group(2))) for m in _TWO_NUMBERS.finditer(text)))


def _number_groups(text: str) -> bool:
    """Three or more groups of digits with 7+ digits in all: a phone or social security number."""
    return any(sum(c.isdigit() for c in m.group()) >= 7 for m in _DIGIT_GROUPS.finditer(text))


def _date_like(text: str) -> bool:
    for match in _THREE_NUMBERS.finditer(text):
        numbers = [int(g) for g in match.groups()]
        if any(_is_date(*order) for order in _orders(numbers)):
            return True
    return False


def _orders(numbers: list[int]) -> list[tuple[int, int, int]]:
    a, b, c = numbers
    return [(a, b, c), (c, a, b), (c, b, a)]  # Y-M-D, M-D-Y, D-M-Y


def _is_date(year: int, month: int, day: int) -> bool:
    return (year < 100 or 1900 <= year <= 2099) and 1 <= month <= 12 and 1 <= day <= 31
