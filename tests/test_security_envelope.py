"""Envelope encryption of blobs: round trips, range reads, tampering detected, KEK
rotation without re-encrypting data, and no PatientName in plain bytes under the lake."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydicom import dcmread

from medlake.security import LocalKeyFileProvider
from medlake.security.envelope import (
    HEADER_SIZE,
    SEGMENT_SIZE,
    decrypt_bytes,
    decrypt_range,
    decrypt_stream,
    encrypt_bytes,
    encrypt_stream,
    parse_header,
    plaintext_size,
    rotate_blobs,
)
from medlake.security.errors import DecryptionFailed, KeyUnavailable
from medlake.storage import open_blob_store

SIZES = [0, 1, SEGMENT_SIZE - 1, SEGMENT_SIZE, SEGMENT_SIZE + 1, 3 * SEGMENT_SIZE + 17]


@pytest.fixture
def keys(tmp_path: Path) -> LocalKeyFileProvider:
    return LocalKeyFileProvider.create(tmp_path / "keys" / "kek.json")


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_and_ranges(keys: LocalKeyFileProvider, size: int) -> None:
    data = os.urandom(size)
    blob = encrypt_bytes(data, keys)
    assert decrypt_bytes(blob, keys) == data
    assert plaintext_size(len(blob)) == size
    chunks = [blob[i : i + 1000] for i in range(0, len(blob), 1000)]
    assert b"".join(decrypt_stream(chunks, keys)) == data
    streamed = b"".join(encrypt_stream((data[i : i + 777] for i in range(0, size, 777)), keys))
    assert decrypt_bytes(streamed, keys) == data

    def read_range(offset: int, length: int) -> bytes:
        return blob[offset : offset + length]

    for offset, length in [
        (0, 10),
        (size // 2, 5000),
        (max(0, size - 3), 10),
        (SEGMENT_SIZE - 2, 4),
    ]:
        expected = data[offset : offset + length]
        assert decrypt_range(read_range, len(blob), offset, length, keys) == expected


def test_tampering_and_truncation_are_detected(keys: LocalKeyFileProvider) -> None:
    data = os.urandom(2 * SEGMENT_SIZE + 100)
    blob = bytearray(encrypt_bytes(data, keys))
    flipped = bytearray(blob)
    flipped[HEADER_SIZE + SEGMENT_SIZE + 40] ^= 1
    with pytest.raises(DecryptionFailed, match="segment 1"):
        decrypt_bytes(bytes(flipped), keys)
    sealed = SEGMENT_SIZE + 16
    cut = bytes(blob[: HEADER_SIZE + 2 * sealed])  # the last segment dropped
    with pytest.raises(DecryptionFailed):
        decrypt_bytes(cut, keys)
    swapped = (
        bytes(blob[:HEADER_SIZE])
        + bytes(blob[HEADER_SIZE + sealed : HEADER_SIZE + 2 * sealed])
        + bytes(blob[HEADER_SIZE : HEADER_SIZE + sealed])
        + bytes(blob[HEADER_SIZE + 2 * sealed :])
    )
    with pytest.raises(DecryptionFailed):
        decrypt_bytes(swapped, keys)
    stranger = LocalKeyFileProvider.create(keys.path.with_name("other.json"))
    with pytest.raises(KeyUnavailable):
        decrypt_bytes(bytes(blob), stranger)


def test_key_file_is_private_and_keys_stay_out_of_repr(keys: LocalKeyFileProvider) -> None:
    assert keys.path.stat().st_mode & 0o777 == 0o600
    secret = keys.path.read_text()
    assert keys.current_key_id in repr(keys)
    assert not any(part in repr(keys) for part in secret.split('"') if len(part) > 40)


@pytest.mark.parametrize("lake", ["local", "memory"])
def test_rotation_rewraps_data_keys_without_touching_the_data(
    keys: LocalKeyFileProvider, tmp_path: Path, lake: str
) -> None:
    root = (
        str(tmp_path / "lake") if lake == "local" else f"memory://rotation-{os.getpid()}-{id(keys)}"
    )
    store = open_blob_store(root)
    originals = {
        f"medlake/default/blob-{n}.dcm": os.urandom(SEGMENT_SIZE + n * 1000) for n in range(3)
    }
    for key, data in originals.items():
        store.put_bytes(key, encrypt_bytes(data, keys))
    store.put_bytes("medlake/default/plain.txt", b"not encrypted")
    before = {key: store.read_bytes(key) for key in originals}
    old = keys.current_key_id
    new = keys.add_key()
    report = rotate_blobs(store, "medlake", keys)
    assert (report.rewrapped, report.current, report.not_encrypted) == (3, 0, 1)
    keys.remove_key(old)
    rotated = LocalKeyFileProvider(keys.path)  # only the new KEK is left in the file
    for key, data in originals.items():
        blob = store.read_bytes(key)
        assert parse_header(blob).kek_id == new
        assert blob[HEADER_SIZE:] == before[key][HEADER_SIZE:]  # data not re-encrypted
        assert decrypt_bytes(blob, rotated) == data
    again = rotate_blobs(store, "medlake", rotated)
    assert (again.rewrapped, again.current) == (0, 3)


def test_no_patient_name_in_plain_bytes_under_the_lake(
    keys: LocalKeyFileProvider, tmp_path: Path, demo_files: list[Path]
) -> None:
    lake = tmp_path / "lake"
    store = open_blob_store(str(lake))
    names = set()
    for n, path in enumerate(demo_files):
        names.add(str(dcmread(path, stop_before_pixels=True).PatientName))
        store.put_bytes(
            f"medlake/default/dicom/default/default/{n}.dcm", encrypt_bytes(path.read_bytes(), keys)
        )
    assert names and all(names)
    assert any(
        name.encode() in demo_files[0].read_bytes() for name in names
    )  # plain files have them
    # Forms shorter than 6 bytes are left out: a 3-byte family name such as "POE" turns
    # up by chance in megabytes of ciphertext (one chance in 2**24 at every offset).
    forms = {form for name in names for form in (name, name.split("^")[0]) if len(form) >= 6}
    assert forms
    for file in lake.rglob("*"):
        if file.is_file():
            content = file.read_bytes()
            for form in forms:
                assert form.encode() not in content, (file, form)
    key = "medlake/default/dicom/default/default/0.dcm"
    assert decrypt_bytes(store.read_bytes(key), keys) == demo_files[0].read_bytes()
