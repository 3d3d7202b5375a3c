"""Explicit device split into per-instance sets, and device-id parsing."""

import pytest

from jaxserve.parallel.devices import devices_by_ids, parse_device_ids, split_devices


def test_split_devices_is_consecutive_and_disjoint(devices):
    parts = split_devices(devices, [2, 4, 1])
    assert parts == [list(devices[:2]), list(devices[2:6]), [devices[6]]]
    assert split_devices(devices, [8]) == [list(devices)]


def test_split_devices_errors(devices):
    with pytest.raises(ValueError, match=r"need 9 devices, only 8 available"):
        split_devices(devices, [4, 5])
    with pytest.raises(ValueError, match="positive integer"):
        split_devices(devices, [2, 0])
    with pytest.raises(ValueError, match="more than once"):
        split_devices([devices[0], devices[0]], [1, 1])


def test_parse_device_ids():
    assert parse_device_ids("0,1,2") == [0, 1, 2]
    assert parse_device_ids(" 4-6, 0 ") == [4, 5, 6, 0]
    for bad, msg in (("", "empty"), ("0,,1", "empty"), ("a", "not an id"), ("3-1", "not an id"),
                     ("1,1", "more than once"), ("0-2,2", "more than once")):
        with pytest.raises(ValueError, match=msg):
            parse_device_ids(bad)


def test_devices_by_ids(devices):
    assert devices_by_ids([3, 1], devices) == [devices[3], devices[1]]
    assert devices_by_ids(parse_device_ids("0-1")) == list(devices[:2])
    with pytest.raises(ValueError, match=r"no device with id \[42\]"):
        devices_by_ids([1, 42], devices)
