"""DICOM header de-identification: the PS3.15 Annex E basic confidentiality profile, kept science.

The action table (D / Z / X / U and their combinations, per attribute, Table E.1-1 of the
DICOM standard, 2026c edition) is the one maintained by KitwareMedical's ``dicom-anonymizer``
(``dicomanonymizer``); this module applies it and adds what the profile also requires or what a
research export needs:

* UIDs (``U``) replaced by keyed hashes: ``2.25.<int>`` from HMAC-like hashing of the old UID
  with the project's secret key, so the same study/series/instance UID maps to the same new UID
  in every file and every run with that key (references stay consistent), yet cannot be
  reversed or recomputed without the key.
* private attributes removed (also inside sequences), curves (50xx) and overlays (60xx) removed.
* the table applied again inside every sequence item that survived (the library only acts on
  the top level), and a value sweep: any remaining text attribute containing one of the
  original identifiers (patient name parts, IDs, birth date, accession number, institution,
  physician names) is emptied.
* ``PatientIdentityRemoved = YES``, ``DeidentificationMethod`` and the code 113100 (basic
  profile) in ``DeidentificationMethodCodeSequence``; ``BurnedInAnnotation = NO`` only when the
  pixels were scrubbed with OCR.

Kept (not in the profile's table, and forced to K by ``KEEP_KEYWORDS`` should an edition add
them): ``PixelSpacing``, ``SequenceOfUltrasoundRegions`` (physical deltas and region boxes),
``FrameTime``, ``FrameTimeVector``, ``CineRate``, ``RecommendedDisplayFrameRate``, the
enhanced-volume pixel measures, the pixel-module attributes.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator
from typing import Any

# The dicom-anonymizer table edition used (Table E.1-1 of PS3.15 2026c).
PROFILE_TABLE = "dicomfields_2026c"
BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
# Attributes whose values are direct identifiers; collected before scrubbing for the value sweep.
IDENTIFIER_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthDate",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
)
# What measurements need, kept whatever the table edition says (none is in the 2026c table;
# this guards against a future edition or library version).
KEEP_KEYWORDS: tuple[str, ...] = (
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SequenceOfUltrasoundRegions",
    "FrameTime",
    "FrameTimeVector",
    "FrameIncrementPointer",
    "CineRate",
    "RecommendedDisplayFrameRate",
    "SpacingBetweenSlices",
    "SliceThickness",
    "SharedFunctionalGroupsSequence",
    "PixelMeasuresSequence",
    "NumberOfFrames",
    "SOPClassUID",
    "Modality",
)
# Identifier fragments shorter than this are not swept (they would match innocent text).
MIN_IDENTIFIER_CHARS = 4
_TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR", "DA", "DT"})
_patch_lock = threading.Lock()


def hashed_uid(key: bytes, uid: str) -> str:
    """A new UID ``2.25.<decimal>`` (≤ 64 chars) derived from ``uid`` and the secret ``key``."""
    import hmac

    digest = hmac.new(key, str(uid).strip().encode("ascii", "replace"), hashlib.sha256).digest()
    # 2.25 UIDs are 128-bit integers (ISO/IEC 9834-8); the top bits of the MAC are enough.
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


@contextlib.contextmanager
def _keyed_uids(key: bytes) -> Iterator[None]:
    """Make dicom-anonymizer's UID replacement use :func:`hashed_uid` with ``key`` (not random).

    The library looks ``get_UID`` up in its module at call time; it is swapped under a lock.
    """
    from dicomanonymizer import simpledicomanonymizer as sda

    with _patch_lock:
        original = sda.get_UID
        sda.get_UID = lambda old: hashed_uid(key, old)
        try:
            yield
        finally:
            sda.get_UID = original


def _identifier_strings(ds: Any) -> set[str]:
    """Lower-case identifier values (and name components) of ``ds`` worth sweeping for."""
    from pydicom.multival import MultiValue

    found: set[str] = set()
    for keyword in IDENTIFIER_KEYWORDS:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        for item in values:
            text = str(item).strip()
            parts = {text, *text.replace("^", " ").replace(",", " ").split()}
            found.update(p.lower() for p in parts if len(p) >= MIN_IDENTIFIER_CHARS)
    return found


def _sweep_values(ds: Any, identifiers: set[str]) -> int:
    """Empty every text attribute (any depth) containing an identifier; returns how many."""
    if not identifiers:
        return 0
    hits = 0

    def visit(dataset: Any, elem: Any) -> None:
        nonlocal hits
        if elem.VR not in _TEXT_VRS or elem.value in (None, ""):
            return
        text = str(elem.value).lower()
        if any(ident in text for ident in identifiers):
            elem.value = "" if elem.VR not in ("DA", "DT") else "00010101"
            hits += 1

    ds.walk(visit)
    return hits


def _nested_items(ds: Any) -> Iterator[Any]:
    """Every dataset inside a sequence of ``ds``, depth first."""
    for elem in list(ds):
        if elem.VR == "SQ" and elem.value:
            for item in elem.value:
                yield item
                yield from _nested_items(item)


def deidentify_dataset(ds: Any, key: bytes, *, pixels_scrubbed_with_ocr: bool) -> Any:
    """Apply the basic profile to a pydicom ``Dataset`` in place and return it.

    Args:
        ds: the dataset (its ``file_meta`` is rebuilt by the caller when saving).
        key: secret key for the UID hashes (same key → same UIDs).
        pixels_scrubbed_with_ocr: the caller removed burned-in text with OCR; only then is
            ``BurnedInAnnotation`` set to ``NO``.
    """
    from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions, keep
    from pydicom.datadict import tag_for_keyword
    from pydicom.dataset import Dataset

    identifiers = _identifier_strings(ds)

    def rules() -> dict:
        actions = initialize_actions(PROFILE_TABLE)
        for keyword in KEEP_KEYWORDS:
            tag = tag_for_keyword(keyword)
            actions[(tag >> 16, tag & 0xFFFF)] = keep
        return actions

    with _keyed_uids(key):
        anonymize_dataset(ds, None, True, rules)
        for item in list(_nested_items(ds)):
            anonymize_dataset(item, None, True, rules)
    ds.remove_private_tags()
    for elem in list(ds):
        if elem.tag.group & 0xFF00 in (0x5000, 0x6000):  # curves, overlays
            del ds[elem.tag]
    _sweep_values(ds, identifiers)

    ds.PatientIdentityRemoved = "YES"
    # LO values hold at most 64 characters each; the attribute may have several.
    ds.DeidentificationMethod = [
        "usfm-core deidentify",
        f"PS3.15 Annex E basic profile ({PROFILE_TABLE})",
        "keyed-hash UIDs",
        "burned-in text removed " + ("with OCR" if pixels_scrubbed_with_ocr else "without OCR"),
    ]
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = BASIC_PROFILE_CODE
    ds.DeidentificationMethodCodeSequence = [code]
    if pixels_scrubbed_with_ocr:
        ds.BurnedInAnnotation = "NO"
    return ds
