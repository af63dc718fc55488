"""Cross-entropy against a naive numpy computation; L2Wrap's value and gradient by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwkv_jax.train import losses

B, T, V = 3, 5, 11


def _inputs(seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = (rng.standard_normal((B, T, V)) * scale).astype(np.float32)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  return logits, targets


def _naive_nll(logits, targets):
  """Per-position -log softmax(logits)[target], in float64 with an explicit loop."""
  out = np.zeros(targets.shape, np.float64)
  for b in range(targets.shape[0]):
    for t in range(targets.shape[1]):
      row = logits[b, t].astype(np.float64)
      out[b, t] = np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[targets[b, t]]
  return out


def _ce_grad(logits, targets, weights):
  """d(sum w * nll / sum w)/dlogits = (softmax - onehot) * w / sum w."""
  x = logits.astype(np.float64)
  p = np.exp(x - x.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p[np.arange(B)[:, None], np.arange(T)[None, :], targets] -= 1
  return p * (weights / weights.sum())[..., None]


def test_cross_entropy_matches_naive_mean():
  logits, targets = _inputs()
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  np.testing.assert_allclose(got, _naive_nll(logits, targets).mean(), rtol=1e-6)


def test_cross_entropy_masked_mean_ignores_masked_positions():
  logits, targets = _inputs(1)
  mask = np.random.default_rng(2).integers(0, 2, (B, T)).astype(np.float32)
  mask[0, 0] = 1
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  want = (_naive_nll(logits, targets) * mask).sum() / mask.sum()
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cross_entropy_is_stable_for_huge_logits():
  logits, targets = _inputs(3)
  logits = logits * 1e4  # exp would overflow float32 without the max shift
  got = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  assert np.isfinite(got)
  np.testing.assert_allclose(got, _naive_nll(logits, targets).mean(), rtol=1e-5)


def test_l2wrap_forward_is_the_loss_unchanged():
  logits, targets = _inputs(4)
  plain = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  wrapped, metrics = losses.lm_loss(jnp.asarray(logits), jnp.asarray(targets))
  assert float(wrapped) == float(plain)
  assert float(metrics["loss"]) == float(plain)


@pytest.mark.parametrize("masked", [False, True])
def test_l2wrap_gradient_is_ce_gradient_plus_scatter_at_argmax(masked):
  logits, targets = _inputs(5)
  logits[..., 0] -= 10.0  # a negative max on some rows: the term must follow the sign
  logits[1, 2] = -np.abs(logits[1, 2]) - 1.0
  assert all(np.sum(row == row.max()) == 1 for row in logits.reshape(-1, V))  # no ties
  mask = np.ones((B, T), np.float32)
  if masked:
    mask[0, 1:3] = 0
  grad = jax.grad(lambda x: losses.lm_loss(x, jnp.asarray(targets), jnp.asarray(mask))[0])(
      jnp.asarray(logits))

  extra = np.zeros((B, T, V), np.float64)
  for b in range(B):
    for t in range(T):  # every position, masked or not, as in the official trainer
      v = int(np.argmax(logits[b, t]))
      extra[b, t, v] = 1e-4 / (B * T) * logits[b, t, v]
  want = _ce_grad(logits, targets, mask) + extra
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-9)
  assert np.abs(extra).max() > 1e-5  # the term is large enough for the check to see it


def test_l2wrap_term_ignores_the_cotangent_like_the_official_backward():
  logits, targets = _inputs(6)
  x, y = jnp.asarray(logits), jnp.asarray(targets)
  g0 = np.asarray(jax.grad(lambda x: 0.0 * losses.lm_loss(x, y)[0])(x))
  flat = logits.reshape(-1, V)
  want = np.zeros_like(flat)
  want[np.arange(B * T), flat.argmax(-1)] = 1e-4 / (B * T) * flat.max(-1)
  np.testing.assert_allclose(g0.reshape(-1, V), want, rtol=1e-6)
  assert np.count_nonzero(g0) == B * T


def test_l2wrap_factor_zero_gives_plain_cross_entropy_gradient():
  logits, targets = _inputs(7)
  x, y = jnp.asarray(logits), jnp.asarray(targets)
  g = jax.grad(lambda x: losses.lm_loss(x, y, l2wrap_factor=0.0)[0])(x)
  np.testing.assert_allclose(g, _ce_grad(logits, targets, np.ones((B, T))), rtol=1e-5,
                             atol=1e-9)


def test_lm_loss_metrics_accuracy_and_token_count():
  logits, targets = _inputs(8)
  targets[0] = np.argmax(logits[0], -1)  # first row all correct
  mask = np.ones((B, T), np.float32)
  mask[2] = 0
  _, m = losses.lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  correct = (np.argmax(logits, -1) == targets) * mask
  np.testing.assert_allclose(m["accuracy"], correct.sum() / mask.sum(), rtol=1e-6)
  assert float(m["num_tokens"]) == mask.sum()


def test_shape_mismatch_raises_a_clear_error():
  logits, targets = _inputs(9)
  with pytest.raises(ValueError, match="targets"):
    losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets[:, :-1]))
  with pytest.raises(ValueError, match="mask"):
    losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.ones((B,)))
