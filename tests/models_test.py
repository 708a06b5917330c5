"""Tests of iat_jax.models: masks, causality, stop-gradient, switches, cost.

Every model is jitted once per config and re-run on perturbed batches of the
same shapes. "Unchanged" means equal within 1e-6 absolute.
"""

import dataclasses

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from iat_jax import models
from iat_jax import validation
from iat_jax.data import examples
from iat_jax.data import synthetic
from iat_jax.models import embedding
from iat_jax.models import interaction
from iat_jax.models import sequence
from iat_jax.models import source
from iat_jax.train import cost
from tests import model_fixtures as mf

SCHEMA = mf.SCHEMA
D = mf.tiny_config().model.insemb_dim  # InsEmb width d
L = mf.tiny_config().model.hist_len  # IAT history length L
ATOL = 1e-6
# Per-instance feature keys (the prefix 'past_' selects the past instances').
FEATURE_KEYS = ("cat", "mh_tags", "dense", "seq_item", "seq_category", "seq_action")


def _perturbed(batch, keys, where, seed=1):
  """Copy of `batch` with keys' entries replaced where `where` [lead] holds."""
  rng = np.random.default_rng(seed)
  other = dict(batch)
  for k in keys:
    x = np.asarray(batch[k])
    w = np.asarray(where).reshape(where.shape + (1,) * (x.ndim - where.ndim))
    if x.dtype == bool:
      new = rng.integers(0, 2, x.shape).astype(bool)
    elif np.issubdtype(x.dtype, np.integer):
      new = rng.integers(1, 3, x.shape).astype(x.dtype)  # valid in every vocab
    else:
      new = (rng.normal(size=x.shape) * 5).astype(x.dtype)
    other[k] = np.where(w, new, x)
  return other


def _forward(model):
  return mf.jit(lambda p, b: model.apply({"params": p}, b))


def _loss_grads(model):
  """jit((params, batch) -> ((loss, outputs), grads))."""

  def loss(p, b):
    out = model.apply({"params": p}, b, train=True)
    bce = optax.sigmoid_binary_cross_entropy(out["logits"], b["labels"])
    return bce.mean(), out

  return mf.jit(jax.value_and_grad(loss, has_aux=True))


def _assert_finite(tree):
  for x in jax.tree_util.tree_leaves(tree):
    assert np.all(np.isfinite(np.asarray(x, np.float32))), "non-finite value"


class EncoderTest(parameterized.TestCase):

  @parameterized.parameters("din", "transformer", "longer")
  def test_padding_is_ignored_and_empty_is_finite(self, name):
    block = models.encoder_config(name,
                                  width=8,
                                  heads=2,
                                  layers=1,
                                  ffn_mult=2,
                                  din_mlp=(8,),
                                  longer_merge=3,
                                  longer_recent_k=2)
    enc = sequence.make_encoder(block, max_len=7, dropout_rate=0.0, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    query = rng.normal(size=(3, 5)).astype(np.float32)
    seq = rng.normal(size=(3, 7, 6)).astype(np.float32)
    profile = rng.normal(size=(3, 1, 4)).astype(np.float32)
    mask = np.zeros((3, 7), bool)  # row 0: nothing valid
    mask[1, :3] = True  # prefix
    mask[2, [0, 2, 3, 6]] = True  # holes, a partly valid merge group
    params = jax.tree_util.tree_map(
        lambda x: rng.normal(size=x.shape).astype(np.float32) * 0.5,
        jax.eval_shape(enc.init, jax.random.key(0), query, seq, mask, profile))
    fn = mf.jit(enc.apply)
    out = np.asarray(fn(params, query, seq, mask, profile))
    _assert_finite(out)
    noise = rng.normal(size=seq.shape).astype(np.float32) * 10
    out2 = fn(params, query, np.where(mask[..., None], seq, noise), mask, profile)
    np.testing.assert_allclose(out, out2, atol=ATOL)
    # A valid position does matter.
    seq3 = seq.copy()
    seq3[1, 0] += 3.0
    self.assertGreater(
        np.abs(out - fn(params, query, seq3, mask, profile))[1].max(), 1e-4)


class BaseModelTest(parameterized.TestCase):

  # The trunk with 'transformer' / 'longer' runs in DownstreamTest.
  @parameterized.named_parameters(
      ("din", dict(seq=dict(encoder="din"))),
      ("mlp_noseq_bf16",
       dict(seq=dict(encoder="none"), interaction="mlp", dtype="bfloat16")),
  )
  def test_forward_backward(self, overrides):
    model = mf.make_model("base", **overrides)
    batch = examples.base_batch(SCHEMA)
    params = mf.random_params(model, batch)
    (loss, out), grads = _loss_grads(model)(params, batch)
    self.assertEqual(out["logits"].shape, (4, SCHEMA.num_tasks))
    self.assertEqual(out["logits"].dtype, jnp.float32)
    _assert_finite((loss, out, grads))
    self.assertGreater(np.abs(grads["trunk"]["embed"]["embedding"]).max(), 0.0)
    self.assertEqual(params["trunk"]["embed"]["embedding"].dtype, jnp.float32)

  def test_dropout(self):
    model = mf.make_model("base", seq=dict(encoder="din"), dropout_rate=0.5)
    batch = examples.base_batch(SCHEMA)
    params = mf.random_params(model, batch)
    fn = mf.jit(lambda p, b, r, train: model.apply(
        {"params": p}, b, train=train, rngs={"dropout": r})["logits"],
                static_argnames="train")
    r1, r2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(fn(params, batch, r1, train=False),
                                  fn(params, batch, r2, train=False))
    self.assertGreater(
        np.abs(fn(params, batch, r1, train=True) -
               fn(params, batch, r2, train=True)).max(), 1e-4)

  def test_bad_names(self):
    with self.assertRaisesRegex(ValueError, "--config.stage: 'bogus'.*'base'"):
      mf.make_model("bogus")
    config = mf.tiny_config(seq=dict(encoder="rnn"))
    with self.assertRaisesRegex(ValueError, "--config.model.seq.encoder: 'rnn'"):
      validation.validate(config)
    with self.assertRaisesRegex(ValueError, "unknown sequence encoder 'rnn'"):
      mf.abstract_params(mf.make_model("base", config), examples.base_batch(SCHEMA))
    config = mf.tiny_config(iat=dict(encoder="none"))  # only seq allows 'none'
    with self.assertRaisesRegex(ValueError, "--config.model.iat.encoder: 'none'"):
      validation.validate(config)

  def test_negative_label_delay_names_the_flag(self):
    config = mf.tiny_config()
    config.data.synthetic.conversion_delay = -1
    with self.assertRaisesRegex(ValueError, "--config.data.synthetic.conversion_delay"):
      validation.validate(config)


class UserSourceTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = mf.make_model("source_user")
    cls.batch = examples.user_batch(SCHEMA, bu=2, t=5)
    cls.params = mf.random_params(cls.model, cls.batch)
    cls.fwd = staticmethod(_forward(cls.model))
    cls.out = jax.device_get(cls.fwd(cls.params, cls.batch))

  def test_shapes_and_grads(self):
    (_, out), grads = _loss_grads(self.model)(self.params, self.batch)
    self.assertEqual(out["logits"].shape, (2, 5, 2))
    self.assertEqual(out["insemb"].shape, (2, 5, D))
    _assert_finite(grads)
    self.assertGreater(
        np.abs(grads["sit"]["block_0"]["attn"]["query"]["kernel"]).max(), 0.0)

  @parameterized.parameters(0, 2, 3)
  def test_causality(self, t):
    """Changing instances t+1.. (features, labels, mask) keeps outputs <= t."""
    later = np.arange(5)[None, :].repeat(2, 0) > t
    other = _perturbed(self.batch, FEATURE_KEYS + ("labels", "mask"), later)
    out = self.fwd(self.params, other)
    for k in ("logits", "sit_out", "insemb"):
      np.testing.assert_allclose(out[k][:, :t + 1],
                                 self.out[k][:, :t + 1],
                                 atol=ATOL,
                                 err_msg=k)
    self.assertGreater(
        np.abs(out["sit_out"][0, t + 1:] - self.out["sit_out"][0, t + 1:]).max(), 1e-4)

  def test_dummy_instances_change_nothing_real(self):
    batch = dict(self.batch)
    mask = np.ones((2, 5), bool)
    mask[0, 1] = False  # a dummy in the middle
    mask[1, 3:] = False  # dummies at the end
    batch["mask"] = batch["token_mask"] = mask
    base = self.fwd(self.params, batch)
    out = self.fwd(self.params, _perturbed(batch, FEATURE_KEYS, ~mask))
    for k in ("logits", "sit_out"):
      np.testing.assert_allclose(np.asarray(out[k])[mask],
                                 np.asarray(base[k])[mask],
                                 atol=ATOL)

  def test_insemb_is_pre_sit_compression(self):
    e = mf.jit(lambda p, b: self.model.apply(
        {"params": p}, b, n_lead=2, method=source.UserSource.embed_instances))(
            self.params, self.batch)
    np.testing.assert_allclose(self.out["insemb"],
                               np.asarray(e).reshape(2, 5, -1),
                               atol=ATOL)
    np.testing.assert_array_equal(self.out["insemb"], self.out["compressed"])
    self.assertGreater(np.abs(self.out["insemb"] - self.out["sit_out"]).max(), 1e-3)

  def test_insemb_after_sit_switch(self):
    model = mf.make_model("source_user", insemb_after_sit=True)
    out = _forward(model)(self.params, self.batch)
    np.testing.assert_array_equal(out["insemb"], out["sit_out"])
    np.testing.assert_allclose(out["sit_out"], self.out["sit_out"], atol=ATOL)

  @parameterized.parameters(([0, 0, 2, 2, 4],), ([0, 1, 1, 3, 3],))
  def test_stream_form_matches_user_order_with_ties(self, groups):
    """SIT over [cur, newest..oldest] == user-order SIT at the last position.

    User 0's chunk holds ties (equal tie groups); the current instance is
    instance 4, the fetched past are the compressed E of its strictly earlier
    instances, newest first, with their tie groups. Same params. Each past
    entry's output matches too: ties among the past follow the same rule.
    """
    groups = np.asarray(groups, np.int32)
    user_batch = dict(self.batch, tie_group=np.stack([groups, np.arange(5)]))
    user = self.fwd(self.params, user_batch)
    past = np.flatnonzero(groups < groups[4])[::-1]  # strictly earlier, newest first
    stream = mf.make_model("source_stream")
    batch = {k: np.asarray(v)[0, 4:5] for k, v in self.batch.items()}
    batch["past_insemb"] = np.asarray(user["compressed"])[0:1, past]
    batch["past_mask"] = np.ones((1, len(past)), bool)
    batch["past_tie_group"] = groups[None, past]
    out = _forward(stream)(self.params, batch)
    np.testing.assert_allclose(out["logits"][0], user["logits"][0, 4], atol=1e-5)
    np.testing.assert_allclose(out["sit_out"][0],
                               np.asarray(user["sit_out"])[0, [4, *past]],
                               atol=1e-5)

  def test_same_timestamp_mate_is_invisible(self):
    """Instances 1, 2 of user 0 tie: changing 1 leaves 2's SIT output as is
    (without the tie it changes it); the strictly later 3 sees the change."""
    tied = dict(self.batch,
                tie_group=np.asarray([[0, 1, 1, 3, 4], [0, 1, 2, 3, 4]], np.int32))
    where = np.zeros((2, 5), bool)
    where[:, 1] = True
    for batch, tie in ((tied, True), (self.batch, False)):
      base = np.asarray(self.fwd(self.params, batch)["sit_out"])
      out = np.asarray(
          self.fwd(self.params, _perturbed(batch, FEATURE_KEYS, where))["sit_out"])
      diff = np.abs(out - base).max(-1)
      self.assertEqual(diff[0, 2] < ATOL, tie, diff)
      self.assertGreater(diff[0, 3], 1e-4)
      self.assertGreater(diff[1, 2], 1e-4)

  def test_context_tokens_are_seen_not_counted(self):
    """token_mask (not mask) decides what the SIT sees: a context token with
    mask False still drives the later tokens' outputs."""
    batch = dict(self.batch, token_mask=np.ones((2, 5), bool))
    batch["mask"] = np.arange(5)[None].repeat(2, 0) >= 2  # 2 context rows
    base = np.asarray(self.fwd(self.params, batch)["sit_out"])
    out = self.fwd(self.params, _perturbed(batch, FEATURE_KEYS, ~batch["mask"]))
    self.assertGreater(
        np.abs(np.asarray(out["sit_out"])[:, 2:] - base[:, 2:]).max(-1).min(), 1e-5)


class StreamSourceTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = mf.make_model("source_stream")
    cls.batch = examples.stream_batch(SCHEMA, d=D, b=4, k=3)  # row i: i valid past
    cls.params = mf.random_params(cls.model, cls.batch)
    cls.fwd = staticmethod(_forward(cls.model))
    cls.out = jax.device_get(cls.fwd(cls.params, cls.batch))

  def test_fetched_entries_drive_position_zero(self):
    valid = self.batch["past_mask"]
    out = self.fwd(self.params, _perturbed(self.batch, ("past_insemb",), valid))
    diff = np.abs(out["logits"] - self.out["logits"]).max(-1)
    self.assertLess(diff[0], ATOL)  # row 0 has no valid past
    self.assertTrue(np.all(diff[1:] > 1e-5), diff)

  def test_masked_fetched_entries_are_ignored(self):
    out = self.fwd(self.params,
                   _perturbed(self.batch, ("past_insemb",), ~self.batch["past_mask"]))
    for k in ("logits", "insemb"):
      np.testing.assert_allclose(out[k], self.out[k], atol=ATOL)
    valid = np.concatenate([np.ones((4, 1), bool), self.batch["past_mask"]], 1)
    np.testing.assert_allclose(np.asarray(out["sit_out"])[valid],
                               self.out["sit_out"][valid],
                               atol=ATOL)

  @parameterized.parameters(1, 2, 3)
  def test_entry_sees_only_older_entries(self, p):
    """SIT output at position p (past entry p) ignores positions < p.

    Positions < p are the current instance (its features are perturbed) and
    the fetched entries newer than entry p. All past entries are made valid.
    """
    batch = dict(self.batch, past_mask=np.ones((4, 3), bool))
    base = np.asarray(self.fwd(self.params, batch)["sit_out"])
    newer = np.arange(3)[None, :].repeat(4, 0) < p - 1
    other = _perturbed(batch, ("past_insemb",), newer)
    other = _perturbed(other, FEATURE_KEYS, np.ones(4, bool), seed=2)
    out = np.asarray(self.fwd(self.params, other)["sit_out"])
    np.testing.assert_allclose(out[:, p:], base[:, p:], atol=ATOL)
    self.assertGreater(np.abs(out[:, 0] - base[:, 0]).max(), 1e-4)

  def test_tied_past_entries_do_not_see_each_other(self):
    """Past entries 1 and 2 (positions 2, 3) tie: changing entry 2 leaves
    entry 1's output as is; the newer entry 0 and the current instance
    (positions 1, 0) see it."""
    batch = dict(self.batch,
                 past_mask=np.ones((4, 3), bool),
                 past_tie_group=np.asarray([[2, 1, 1]] * 4, np.int32))
    base = np.asarray(self.fwd(self.params, batch)["sit_out"])
    where = np.zeros((4, 3), bool)
    where[:, 2] = True
    out = np.asarray(
        self.fwd(self.params, _perturbed(batch, ("past_insemb",), where))["sit_out"])
    np.testing.assert_allclose(out[:, 2], base[:, 2], atol=ATOL)
    self.assertGreater(np.abs(out[:, :2] - base[:, :2]).max(-1).min(), 1e-5)

  def test_stop_gradient_on_fetched(self):
    model, params = self.model, self.params

    def f(past, dense):
      b = dict(self.batch, past_insemb=past, dense=dense)
      return model.apply({"params": params}, b)["logits"].sum()

    g_past, g_dense = mf.jit(jax.grad(f, argnums=(0, 1)))(self.batch["past_insemb"],
                                                          self.batch["dense"])
    np.testing.assert_array_equal(g_past, np.zeros_like(g_past))
    self.assertGreater(np.abs(g_dense).min(), 0.0)

  def test_recompute_mode(self):
    config = mf.tiny_config()
    config.stream.mode = "recompute"
    model = mf.make_model("source_stream", config)
    self.assertEqual(model.mode, "recompute")
    batch = dict(self.batch)
    del batch["past_insemb"]
    params = self.params  # same tree as the fetch mode

    def f(past_dense, dense):
      b = dict(batch, past_dense=past_dense, dense=dense)
      out = model.apply({"params": params}, b)
      return out["logits"].sum(), out

    (_, out), (g_past,
               g_dense) = mf.jit(jax.value_and_grad(f, argnums=(0, 1),
                                                    has_aux=True))(batch["past_dense"],
                                                                   batch["dense"])
    e_past = mf.jit(
        lambda p, b: model.apply({"params": p},
                                 b,
                                 prefix="past_",
                                 n_lead=2,
                                 method=source.StreamSource.embed_instances))(params,
                                                                              batch)
    np.testing.assert_allclose(out["past_insemb"],
                               np.asarray(e_past).reshape(4, 3, -1),
                               atol=ATOL)
    np.testing.assert_array_equal(g_past, np.zeros_like(g_past))
    self.assertGreater(np.abs(g_dense).min(), 0.0)
    _assert_finite(out)


class DownstreamTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("transformer", dict()),
      ("longer", dict(iat=dict(encoder="longer"), seq=dict(encoder="longer"))),
      ("din", dict(iat=dict(encoder="din"), seq=dict(encoder="din"))),
      # Switches, on a cheaper trunk (DIN behaviour encoder).
      ("after_interaction", dict(iat_after_interaction=True, seq=dict(encoder="din"))),
      ("id_query", dict(iat_query="id", seq=dict(encoder="din"))),
      ("no_label_side", dict(use_label_side=False, seq=dict(encoder="din"))),
      ("no_other_side",
       dict(use_other_side=False, interaction="mlp", seq=dict(encoder="din"))),
  )
  def test_forward_backward_and_padding(self, overrides):
    model = mf.make_model("downstream", **overrides)
    batch = examples.downstream_batch(SCHEMA, d=D, l=L, b=4)
    self.assertFalse(batch["hist_mask"][0].any())  # row 0: no history
    params = mf.random_params(model, batch)
    step = _loss_grads(model)
    (loss, out), grads = step(params, batch)
    _assert_finite((loss, out, grads))
    self.assertGreater(np.abs(grads["iat"]["encoder"]["seq_proj"]["kernel"]).max(), 0.0)
    # Masked history slots change nothing.
    hist_keys = ("hist_insemb", "hist_labels", "hist_gap")
    (_, out2), _ = step(params, _perturbed(batch, hist_keys, ~batch["hist_mask"]))
    np.testing.assert_allclose(out2["logits"], out["logits"], atol=ATOL)
    # Valid history slots do matter (rows 1.. have history).
    (_, out3), _ = step(params, _perturbed(batch, ("hist_insemb",), batch["hist_mask"]))
    diff = np.abs(out3["logits"] - out["logits"]).max(-1)
    self.assertLess(diff[0], ATOL)
    self.assertTrue(np.all(diff[1:] > 1e-6), diff)
    # All-masked history everywhere.
    (loss4,
     out4), grads4 = step(params,
                          dict(batch, hist_mask=np.zeros_like(batch["hist_mask"])))
    _assert_finite((loss4, out4, grads4))

  def test_unknown_label_is_not_a_negative(self):
    model = mf.make_model("downstream", interaction="mlp", seq=dict(encoder="din"))
    batch = examples.downstream_batch(SCHEMA, d=D, l=L, b=4)
    params = mf.random_params(model, batch)
    step = _loss_grads(model)
    zeros = np.zeros_like(batch["hist_labels"])
    mask = batch["hist_mask"]
    known = np.broadcast_to(mask[..., None], zeros.shape)
    # Every past label 0: known negatives, then not yet known (delayed).
    (_, neg), _ = step(params, dict(batch, hist_labels=zeros, hist_label_known=known))
    (_, unk), _ = step(params, dict(batch, hist_labels=zeros, hist_label_known=~known))
    diff = np.abs(neg["logits"] - unk["logits"]).max(-1)
    self.assertLess(diff[0], ATOL)  # row 0 has no history: nothing to tell apart
    self.assertTrue(np.all(diff[1:] > 1e-6), diff)
    # The known flag of a masked slot changes nothing.
    (_, out), _ = step(params, batch)
    (_, out2), _ = step(params, _perturbed(batch, ("hist_label_known",), ~mask))
    np.testing.assert_allclose(out2["logits"], out["logits"], atol=ATOL)


class CostTest(absltest.TestCase):

  def test_param_count_matches_hand_count(self):
    """Whole temporal source with DIN + RankMixer, counted by hand."""
    c = mf.tiny_config(seq=dict(encoder="din")).model
    model = mf.make_model("source_temporal", seq=dict(encoder="din"))
    params = mf.abstract_params(model, examples.base_batch(SCHEMA))
    e, w, nt = c.embed_dim, c.seq.width, SCHEMA.num_tasks
    fd = len(SCHEMA.dense)
    _, rows = embedding.table_layout(SCHEMA, c.vocab_pad_multiple)
    emb = rows * e
    emb_dense = 2 * fd * e  # per-field dense scale and bias
    (h1,) = c.seq.din_mlp
    din = (2 * e * w + w) + (3 * e * w + w) + (4 * w * h1 + h1) + (h1 + 1)
    t, dt = c.mixer_tokens, c.mixer_token_dim
    num_fields = len(SCHEMA.categorical) + len(SCHEMA.multi_hot) + fd
    # Groups user 1, item 3, context 2 fields, seq 1 get 1, 3, 1, 1 tokens:
    # every token input is whole fields (or the seq token), none padded.
    self.assertEqual((t, SCHEMA.group_fields()["item"]), (6, (0, 1, 3)))
    f = c.ffn_mult * dt
    mixer = (num_fields * e +
             w) * dt + t * dt + c.mixer_layers * (2 * 2 * dt + t *
                                                  (dt * f + f + f * dt + dt))
    big_d, d, hid = t * dt, c.insemb_dim, c.decompress_hidden
    compress = big_d * d + d
    decompress = d * hid + hid + hid * big_d + big_d
    heads = big_d * nt + nt
    self.assertEqual(
        cost.param_counts(params), {
            "embedding": emb,
            "dense": emb_dense + din + mixer + compress + decompress + heads,
            "total": emb + emb_dense + din + mixer + compress + decompress + heads
        })

  def test_flops_positive_and_grow_with_batch(self):
    model = mf.make_model("base")
    b4, b8 = examples.base_batch(SCHEMA, 4), examples.base_batch(SCHEMA, 8)
    params = mf.random_params(model, b4)
    fn = lambda p, b: model.apply({"params": p}, b)["logits"]
    f4, f8 = cost.flops(fn, params, b4), cost.flops(fn, params, b8)
    self.assertGreater(f4, 0)
    self.assertGreater(f8, 1.5 * f4)

  def test_dot_generals_of_nested_jaxprs(self):
    a, b, c = jnp.ones((4, 8)), jnp.ones((8, 16)), jnp.ones((16, 16))
    q = jnp.ones((2, 3, 5))

    def fn(a, b, c, q):
      y = jax.jit(lambda x: x @ b)(a)  # [4, 8] @ [8, 16], inside a jit
      y, _ = jax.lax.scan(lambda h, _: (h @ c, None), y, None, length=3)
      z = jnp.einsum("bqd,bkd->bqk", q, q)  # batched: 2 x [3, 5] @ [5, 3]
      return y.sum() + z.sum()

    dots = cost.dot_generals(jax.make_jaxpr(fn)(a, b, c, q))
    self.assertEqual([(d.lhs.shape, d.rhs.shape) for d in dots],
                     [((4, 8), (8, 16))] + [((4, 16), (16, 16))] * 3 + [((2, 3, 5),
                                                                         (2, 3, 5))])
    self.assertEqual([d.flops for d in dots],
                     [2 * 4 * 8 * 16] + [2 * 4 * 16 * 16] * 3 + [2 * 2 * 3 * 3 * 5])
    # Differentiating a @ w in w: the forward product and a^T @ cotangent.
    grads = cost.dot_generals(jax.make_jaxpr(jax.grad(lambda w: (a @ w).sum()))(b))
    self.assertEqual(len(grads), 2)


class GroupTokenTest(absltest.TestCase):
  """RankMixer's tokens follow the feature groups (interaction.GroupTokenizer)."""

  def _tokens(self, model, params, batch):
    """Pre-mixing tokens [N, T, Dt] of `model` (captured from the tokenizer)."""
    _, state = model.apply(
        {"params": params},
        batch,
        capture_intermediates=lambda m, _: isinstance(m, interaction.GroupTokenizer),
        mutable=["intermediates"])
    (tokens,) = state["intermediates"]["trunk"]["interaction"]["tokenize"]["__call__"]
    return np.asarray(tokens)

  def test_token_split_follows_widest_runs(self):
    sizes = {"user": (1, 4), "item": (3, 4), "context": (2, 4), "seq": (1, 8)}
    self.assertEqual(interaction.token_split(sizes, 4), dict.fromkeys(sizes, 1))
    # Extra tokens: item (run 12 wide), then item again (8, tie with context).
    self.assertEqual(interaction.token_split(sizes, 6),
                     dict(user=1, item=3, context=1, seq=1))
    self.assertEqual(interaction.token_split(sizes, 7),
                     dict(user=1, item=3, context=2, seq=1))
    for t in (3, 8):
      with self.assertRaisesRegex(ValueError,
                                  f"--config.model.mixer_tokens={t}.*between 4 and 7"):
        interaction.token_split(sizes, t)

  def test_every_item_reaches_exactly_one_token_of_its_group(self):
    n, t, dt = 3, 8, 8
    rng = np.random.default_rng(0)
    widths = dict(user=(1, 4), item=(5, 4), context=(2, 4), seq=(1, 8), iat=(1, 5))
    groups = {
        g: rng.normal(size=(n, m, w)).astype(np.float32) for g, (m, w) in widths.items()
    }
    groups["empty"] = np.zeros((n, 0, 4), np.float32)  # left out
    tok = interaction.GroupTokenizer(t, dt)
    params = tok.init(jax.random.key(0), groups)
    base = np.asarray(tok.apply(params, groups))
    self.assertEqual(base.shape, (n, t, dt))
    split = interaction.token_split(widths, t)
    # Item's 5 fields in 4 tokens: runs of 2, 1, 1, 1 (none all padding).
    self.assertEqual(split, dict(user=1, item=4, context=1, seq=1, iat=1))
    start = dict(zip(split, np.cumsum([0] + list(split.values()))))
    for g, (m, _) in widths.items():
      reached = set()
      for j in range(m):
        other = dict(groups, **{g: groups[g].copy()})
        other[g][:, j] += 1.0
        diff = np.abs(np.asarray(tok.apply(params, other)) - base).max(axis=(0, 2))
        (changed,) = np.nonzero(diff > ATOL)
        self.assertLen(changed, 1, (g, j, diff))
        reached.add(int(changed[0]))
      # The group's items fill exactly its own consecutive tokens.
      self.assertEqual(reached, set(range(start[g], start[g] + split[g])), g)

  def test_iat_token_reaches_only_the_last_token(self):
    model = mf.make_model("downstream")
    batch = mf.stage_batch("downstream")
    params = mf.random_params(model, batch)
    base = self._tokens(model, params, batch)
    t, dt = mf.tiny_config().model.mixer_tokens, mf.tiny_config().model.mixer_token_dim
    self.assertEqual(base.shape, (batch["hist_mask"].shape[0], t, dt))
    # The IAT branch reads the history only; rows 1.. have some.
    other = _perturbed(batch, ("hist_insemb",), batch["hist_mask"])
    diff = np.abs(self._tokens(model, params, other) - base).max(-1)
    np.testing.assert_array_less(diff[:, :-1], ATOL)
    self.assertTrue(np.all(diff[1:, -1] > 1e-4), diff)
    out = model.apply({"params": params}, batch)
    self.assertEqual(out["logits"].shape, (base.shape[0], SCHEMA.num_tasks))

  def test_too_few_tokens_names_the_flag(self):
    config = mf.tiny_config(mixer_tokens=4, mixer_token_dim=8)
    with self.assertRaisesRegex(ValueError, "--config.model.mixer_tokens: 4 is less"):
      validation.validate(config)
    # The model's own check (this schema has 5 groups with the IAT token).
    model = mf.make_model("downstream", config)
    with self.assertRaisesRegex(ValueError, "--config.model.mixer_tokens=4"):
      mf.abstract_params(model, mf.stage_batch("downstream"))

  def test_every_field_has_one_group(self):
    cfg = synthetic.Config(num_users=4,
                           num_instances=8,
                           num_categorical=40,
                           num_dense=12)
    schema = synthetic.make_schema(cfg)
    positions = sorted(i for idx in schema.group_fields().values() for i in idx)
    self.assertEqual(positions, list(range(len(schema.field_names()))))
    self.assertEqual(tuple(schema.group_fields()), ("user", "item", "context"))
    groups = dict(SCHEMA.field_groups)
    del groups["x"]
    with self.assertRaisesRegex(ValueError, r"without a group: \['x'\]"):
      dataclasses.replace(SCHEMA, field_groups=groups)


if __name__ == "__main__":
  absltest.main()
