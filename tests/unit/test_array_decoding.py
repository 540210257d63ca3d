"""The server's decoding of reply arrays: Flower's own result, once per reply."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array

from server.replies import decode_array


@pytest.mark.parametrize("value", [np.arange(12, dtype=np.float32).reshape(3, 4),
                                   np.float32(2.5) * np.ones((2, 1, 3, 3), np.float32),
                                   np.arange(5, dtype=np.int8), np.zeros(0, np.float64),
                                   np.array(7.0, np.float32)])
def test_fast_decoding_equals_flowers(value):
    array = Array(value)
    fast = decode_array(array)
    np.testing.assert_array_equal(fast, array.numpy())
    assert fast.dtype == array.numpy().dtype and fast.shape == array.numpy().shape
    assert not fast.flags.writeable  # a view of the message's bytes: never changed in place


def test_arrays_whose_fields_disagree_with_their_bytes_are_decoded_by_flower():
    array = Array(np.arange(6, dtype=np.float64))
    lying = Array(dtype="float32", shape=(12,), stype=array.stype, data=array.data)
    np.testing.assert_array_equal(decode_array(lying), array.numpy())  # the npy header decides
    fortran = Array(np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    np.testing.assert_array_equal(decode_array(fortran), fortran.numpy())
