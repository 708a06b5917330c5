"""`rows`: quantization, validation of rows to write, the row checksum."""

from absl.testing import absltest
import numpy as np

from iat_jax import errors
from iat_jax.store import rows
from tests import store_fixtures as sf


class RowsTest(absltest.TestCase):

  def test_quantize_bounds(self):
    _, values = sf.data(2_000, 16, seed=1)
    stored, scales = rows.quantize(values, "int8")
    self.assertEqual((stored.dtype, scales.shape), (np.int8, (2_000,)))
    got = stored.astype(np.float32) * scales[:, None]
    bound = np.abs(values).max(axis=1, keepdims=True) / 254
    self.assertTrue((np.abs(got - values) <= bound * sf.INT8_SLACK).all())
    zeros, scale = rows.quantize(np.zeros((1, 4), np.float32), "int8")
    np.testing.assert_array_equal(zeros, [[0, 0, 0, 0]])
    np.testing.assert_array_equal(scale, [1])
    bf16, none = rows.quantize(values, "bfloat16")
    self.assertIsNone(none)
    err = np.abs(bf16.astype(np.float32) - values)
    self.assertTrue((err <= 2.0**-8 * np.abs(values)).all())
    np.testing.assert_array_equal(rows.quantize(values, "float32")[0], values)

  def test_check_rows_sorts_and_refuses(self):
    keys = np.array([5, 1, 3], np.int64)
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    k, v = rows.check_rows("p", keys, values)
    np.testing.assert_array_equal(k, [1, 3, 5])
    self.assertEqual(k.dtype, np.uint64)
    np.testing.assert_array_equal(v, values[[1, 2, 0]])
    with self.assertRaisesRegex(errors.StoreError, "p: duplicate InsIDs"):
      rows.check_rows("p", np.array([1, 1]), values[:2])
    with self.assertRaisesRegex(errors.StoreError, "non-finite"):
      rows.check_rows("p", keys, values + np.inf)
    with self.assertRaisesRegex(errors.StoreError, r"values \(2, 2\) do not match"):
      rows.check_rows("p", keys, values[:2])
    with self.assertRaisesRegex(errors.StoreError, "width 2, the table d=4"):
      rows.check_rows("p", keys, values, d=4)
    with self.assertRaisesRegex(errors.StoreError, "dtype 'int4'"):
      rows.check_dtype("int4")

  def test_checksum_ignores_order_and_grouping_and_updates(self):
    keys, values = sf.data(1_000, 5, seed=2)
    stored, scales = rows.quantize(values, "int8")
    whole = rows.row_checksum(keys, stored, scales)
    order = np.random.default_rng(0).permutation(1_000)
    parts = [
        rows.row_checksum(keys[i], stored[i], scales[i])
        for i in np.array_split(order, 7)
    ]
    self.assertEqual(rows.add_checksums(*parts), whole)
    self.assertNotEqual(rows.row_checksum(keys, stored, scales * 2), whole)
    self.assertEqual(rows.parse_checksum(rows.checksum_hex(whole)), whole)
    # Rows 0..9 replaced and 10 new ones added: the same as hashing the result.
    new_stored, new_scales = rows.quantize(values[:10] + 1, "int8")
    extra_keys = keys[:10] + np.uint64(1)  # sf.data keys are far apart
    upd_keys = np.concatenate([keys[:10], extra_keys])
    upd_stored = np.concatenate([new_stored, new_stored])
    upd_scales = np.concatenate([new_scales, new_scales])
    found = np.arange(20) < 10
    old = (np.where(found[:, None], np.concatenate([stored[:10], stored[:10]]),
                    0), np.where(found, np.concatenate([scales[:10], scales[:10]]),
                                 0), found)
    got = rows.upserted_checksum(rows.checksum_hex(whole), upd_keys, upd_stored,
                                 upd_scales, old)
    want = rows.add_checksums(rows.row_checksum(keys[10:], stored[10:], scales[10:]),
                              rows.row_checksum(upd_keys, upd_stored, upd_scales))
    self.assertEqual(got, rows.checksum_hex(want))


if __name__ == "__main__":
  absltest.main()
