"""The attention core (vpd_jax.models.attention.multi_head_attention): heads-first layout and a written-out backward
pass, checked against a float64 NumPy forward, JAX's own autodiff of the textbook formula, finite differences, and
`jax.nn.dot_product_attention`; and the kernel switch: which kernels run where, the matmul precision of every
kernel's backward pass, and the `Attention` layer's choice from its `Compute`. The Pallas kernels' values are
tested in test_attention_kernels.py."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from vpd_jax.models.attention import Attention, multi_head_attention
from vpd_jax.models.compute import Compute, PallasOptions


def numpy_attention(q, k, v, heads, scale, causal):
    """float64 reference: (output (B, Lq, H*Dv), head-mean probabilities (B, Lq, Lk))."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    (b, lq, _), lk = q.shape, k.shape[1]
    qh, kh, vh = (t.reshape(b, t.shape[1], heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = qh @ kh.transpose(0, 1, 3, 2) * scale
    if causal:
        logits = np.where(np.tril(np.ones((lq, lk), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ vh).transpose(0, 2, 1, 3).reshape(b, lq, -1), probs.mean(1)


def autodiff_attention(q, k, v, heads, scale, causal):
    """The textbook formula in jnp (batch, query, head order), differentiated by JAX itself."""
    b, lq, _ = q.shape
    qh, kh, vh = (t.reshape(b, t.shape[1], heads, -1) for t in (q, k, v))
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) * scale
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones(logits.shape[-2:], bool)), logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, vh).reshape(b, lq, -1), probs.mean(1)


# (batch, Lq, Lk, heads, head dim, value head dim, causal)
CASES = [(2, 12, 12, 2, 8, 8, False), (1, 20, 7, 4, 4, 6, False), (2, 9, 9, 3, 5, 5, True), (1, 16, 16, 1, 8, 8, True)]


def _inputs(case, dtype=np.float32, seed=0):
    b, lq, lk, h, d, dv, _ = case
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, lq, h * d)).astype(dtype), rng.standard_normal((b, lk, h * d)).astype(dtype),
            rng.standard_normal((b, lk, h * dv)).astype(dtype))


@pytest.mark.parametrize("case", CASES)
def test_values_and_maps_match_float64(case):
    q, k, v = _inputs(case)
    heads, causal, scale = case[3], case[6], 0.7
    out, probs = multi_head_attention(q, k, v, heads, scale=scale, causal=causal, return_probs=True)
    ref_out, ref_probs = numpy_attention(q, k, v, heads, scale, causal)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(probs), ref_probs, rtol=1e-5, atol=1e-6)
    plain, none = multi_head_attention(q, k, v, heads, scale=scale, causal=causal)
    assert none is None
    np.testing.assert_allclose(np.asarray(plain), ref_out, rtol=1e-5, atol=1e-5)


def _loss(attention, weights):
    """A loss that reaches every output and, with `weights` for the map, the head-mean probabilities too."""
    out_w, map_w = weights

    def loss(q, k, v):
        out, probs = attention(q, k, v)
        total = jnp.sum(out * out_w)
        return total if probs is None or map_w is None else total + jnp.sum(probs * map_w)
    return loss


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("with_map", [False, True])
def test_gradients_match_autodiff_of_the_textbook_formula(case, with_map):
    q, k, v = _inputs(case)
    heads, causal = case[3], case[6]
    rng = np.random.default_rng(1)
    out_w = rng.standard_normal((q.shape[0], q.shape[1], v.shape[2])).astype(np.float32)
    map_w = 5 * rng.standard_normal((q.shape[0], q.shape[1], k.shape[1])).astype(np.float32) if with_map else None

    ours = _loss(lambda *a: multi_head_attention(*a, heads, causal=causal, return_probs=with_map), (out_w, map_w))
    textbook = _loss(lambda *a: autodiff_attention(*a, heads, case[4] ** -0.5, causal), (out_w, map_w))
    grads = jax.grad(ours, argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(textbook, argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip("qkv", grads, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5 * float(jnp.abs(e).max()),
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("case", CASES[1:3])
def test_gradients_match_finite_differences_in_float64(case):
    heads, causal = case[3], case[6]
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(t, jnp.float64) for t in _inputs(case, np.float64))
        for with_map in (False, True):
            def f(q, k, v):
                out, probs = multi_head_attention(q, k, v, heads, causal=causal, return_probs=with_map)
                return out if probs is None else (out, probs)
            check_grads(f, (q, k, v), order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunk", [4, 6])  # 20 queries, 7 keys: 5 chunks, or 4 with the last one padded
def test_query_chunks_give_the_same_values_and_gradients(chunk):
    case = CASES[1]
    q, k, v = _inputs(case)
    out_w = np.random.default_rng(2).standard_normal((q.shape[0], q.shape[1], v.shape[2])).astype(np.float32)

    def loss_and_grads(query_chunk):
        loss = _loss(lambda *a: multi_head_attention(*a, case[3], query_chunk=query_chunk), (out_w, None))
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    (loss, grads), (loss_c, grads_c) = loss_and_grads(0), loss_and_grads(chunk)
    np.testing.assert_allclose(float(loss_c), float(loss), rtol=1e-6)
    for g, g_c in zip(grads, grads_c):
        np.testing.assert_allclose(np.asarray(g_c), np.asarray(g), rtol=1e-5, atol=1e-6 * float(jnp.abs(g).max()))


def test_query_chunks_match_float64_and_finite_differences():
    """The chunked path (vpd_jax.models.chunked_attention): 20 queries in chunks of 6 (the last one padded), value
    head size unlike the key's; float64 forward against NumPy, gradients against finite differences."""
    case = CASES[1]
    heads, scale = case[3], 0.7
    q, k, v = _inputs(case)
    out, _ = multi_head_attention(q, k, v, heads, scale=scale, query_chunk=6)
    np.testing.assert_allclose(np.asarray(out), numpy_attention(q, k, v, heads, scale, False)[0], rtol=1e-5,
                               atol=1e-5)
    with jax.enable_x64(True):
        q, k, v = (jnp.asarray(t, jnp.float64) for t in _inputs(case, np.float64))
        check_grads(lambda q, k, v: multi_head_attention(q, k, v, heads, scale=scale, query_chunk=6)[0], (q, k, v),
                    order=1, modes=("rev",), eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kernel", ["xla", "dot_product"])
def test_layers_with_no_more_keys_than_a_chunk_attend_all_queries_at_once(kernel):
    """20 queries and 7 keys: chunks of 6 loop over the queries; chunks of 7 or more, as many keys as a chunk has
    queries or fewer (cross-attention over a few tokens), attend at once: no loop in the program, forward or
    backward, and the values of the unchunked call."""
    case = (1, 20, 7, 4, 4, 4, False)  # jax.nn.dot_product_attention takes values of the keys' head size only
    q, k, v = (jnp.asarray(t) for t in _inputs(case))

    def loss(chunk):
        return lambda q, k, v: jnp.sum(multi_head_attention(q, k, v, case[3], implementation=kernel,
                                                            query_chunk=chunk)[0] ** 2)

    def loops(chunk) -> bool:
        return bool(re.search(r"\b(scan|while)\b", str(jax.make_jaxpr(jax.grad(loss(chunk), (0, 1, 2)))(q, k, v))))

    assert loops(6) and not loops(0)
    for chunk in (7, 8, 64):
        assert not loops(chunk), chunk
        np.testing.assert_array_equal(np.asarray(jax.jit(loss(chunk))(q, k, v)), np.asarray(jax.jit(loss(0))(q, k, v)))


@pytest.mark.parametrize("kernel", ["xla", "dot_product"])
def test_causal_attention_takes_a_query_chunk_only_where_the_layer_attends_at_once(kernel):
    """Causal attention has no chunked form: a chunk the layer would loop over is refused, naming it; a chunk it
    does not loop over (no more keys than the chunk has queries, or one chunk for every query) gives the
    unchunked causal values."""
    case = (1, 20, 7, 4, 4, 4, True)
    q, k, v = (jnp.asarray(t) for t in _inputs(case))
    with pytest.raises(ValueError, match=r"query_chunk=6 with causal attention over 20 queries and 7 keys"):
        multi_head_attention(q, k, v, case[3], causal=True, implementation=kernel, query_chunk=6)
    expected, _ = numpy_attention(q, k, v, case[3], case[4] ** -0.5, causal=True)
    unchunked = np.asarray(multi_head_attention(q, k, v, case[3], causal=True, implementation=kernel)[0])
    np.testing.assert_allclose(unchunked, expected, rtol=1e-5, atol=1e-6)
    for chunk in (7, 20, 64):
        out, _ = multi_head_attention(q, k, v, case[3], causal=True, implementation=kernel, query_chunk=chunk)
        np.testing.assert_array_equal(np.asarray(out), unchunked, err_msg=f"query_chunk={chunk}")


def test_query_chunks_in_bfloat16_stay_close_to_float32():
    q, k, v = (jnp.asarray(t) for t in _inputs(CASES[0]))
    w = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape[:2] + (v.shape[2],)), jnp.float32)

    def loss(q, k, v, dtype):
        out = multi_head_attention(*(t.astype(dtype) for t in (q, k, v)), CASES[0][3], query_chunk=5)[0]
        assert out.dtype == dtype
        return jnp.sum(out.astype(jnp.float32) * w)

    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, jnp.float32)
    grads_bf16 = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, jnp.bfloat16)
    for g, g_bf16 in zip(grads, grads_bf16):
        assert g_bf16.dtype == jnp.float32  # the cotangents of the float32 inputs
        assert float(jnp.max(jnp.abs(g_bf16 - g)) / jnp.max(jnp.abs(g))) < 0.03


@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_same_as_jax_dot_product_attention_and_its_implementation_switch(case):
    q, k, v = _inputs(case)
    heads, causal = case[3], case[6]
    split = [t.reshape(*t.shape[:2], heads, -1) for t in (q, k, v)]
    expected = np.asarray(jax.nn.dot_product_attention(*split, is_causal=causal)).reshape(q.shape[0], q.shape[1], -1)
    out, _ = multi_head_attention(q, k, v, heads, causal=causal)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)
    via_jax, _ = multi_head_attention(q, k, v, heads, causal=causal, implementation="dot_product")
    np.testing.assert_allclose(np.asarray(via_jax), expected, rtol=1e-6, atol=1e-7)


def test_bfloat16_inputs_give_bfloat16_outputs_and_gradients_close_to_float32():
    case = CASES[0]
    q, k, v = _inputs(case)
    heads = case[3]
    out_w = np.random.default_rng(3).standard_normal((q.shape[0], q.shape[1], v.shape[2])).astype(np.float32)
    map_w = np.random.default_rng(4).standard_normal((q.shape[0], q.shape[1], k.shape[1])).astype(np.float32)
    loss = _loss(lambda *a: multi_head_attention(*a, heads, return_probs=True), (out_w, map_w))
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    bf16 = [jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)]
    out, probs = multi_head_attention(*bf16, heads, return_probs=True)
    assert out.dtype == jnp.bfloat16 and probs.dtype == jnp.float32
    ref_out, ref_probs = numpy_attention(q, k, v, heads, case[4] ** -0.5, False)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref_out, atol=0.05 * np.abs(ref_out).max())
    np.testing.assert_allclose(np.asarray(probs), ref_probs, atol=0.02)
    grads_bf16 = jax.grad(loss, argnums=(0, 1, 2))(*bf16)
    for name, g, g16 in zip("qkv", grads, grads_bf16):
        assert g16.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(g16, np.float32), np.asarray(g), atol=0.05 * float(jnp.abs(g).max()),
                                   err_msg=f"d{name}")


def nested_equations(jaxpr):
    """Every equation of `jaxpr` and of the jaxprs inside it (Pallas kernels, custom VJPs, jits, shard_maps)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr, or a Jaxpr
                if hasattr(inner, "eqns"):
                    yield from nested_equations(inner)


@pytest.mark.parametrize("kernel, maps", [("xla", False), ("xla", True), ("splash", False), ("flash", False),
                                          ("pallas", True)])
def test_backward_pass_keeps_the_matmul_precision_of_the_forward_pass(kernel, maps):
    """A custom VJP's backward pass is traced after the model's precision scope has closed: every matmul of the
    gradient, the kernels' own included, still has the precision asked for ('highest')."""
    q, k, v = _inputs((1, 128, 77, 2, 40, 40, False))

    def loss(q, k, v):
        with jax.default_matmul_precision("highest"):
            kernels = dict(map_implementation=kernel) if maps else dict(implementation=kernel)
            out, probs = multi_head_attention(q, k, v, 2, return_probs=maps, pallas=PallasOptions(interpret=True),
                                              **kernels)
        return jnp.sum(out) + (jnp.sum(probs * probs) if maps else 0.0)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    precisions = [eqn.params["precision"] for eqn in nested_equations(jaxpr) if eqn.primitive.name == "dot_general"]
    assert len(precisions) >= 5  # the forward pass's two matmuls, and the backward pass's
    assert set(precisions) == {(jax.lax.Precision.HIGHEST,) * 2}, precisions


def test_kernels_missing_on_this_platform_are_refused_naming_the_choices():
    q, k, v = _inputs(CASES[0])
    platform = jax.default_backend()
    assert platform == "cpu"
    for kernels, maps, needed in ((dict(implementation="cudnn"), False, "GPU"),
                                  (dict(implementation="splash"), False, "TPU"),
                                  (dict(implementation="flash"), False, "TPU"),
                                  (dict(map_implementation="pallas"), True, "TPU")):
        name = next(iter(kernels.values()))
        valid = "('xla',)" if maps else "('xla', 'dot_product')"
        with pytest.raises(ValueError, match=rf"'{name}' runs on {needed}s only; on this 'cpu' platform use one of "
                                             rf"{re.escape(valid)}"):
            multi_head_attention(q, k, v, 2, return_probs=maps, **kernels)
    # A kernel the layer does not run is only checked for its name.
    out, _ = multi_head_attention(q, k, v, 2, map_implementation="pallas")
    assert out.shape == q.shape
    for kernels, error in ((dict(implementation="splash2"), r"unknown attention kernel 'splash2'; valid: \('xla', "),
                           (dict(map_implementation="cudnn"), r"unknown map attention kernel 'cudnn'; valid: "
                                                              r"\('xla', 'pallas'\)")):
        with pytest.raises(ValueError, match=error):
            multi_head_attention(q, k, v, 2, **kernels)


def test_pallas_kernels_refuse_causal_attention_and_the_high_matmul_precision():
    q, k, v = _inputs(CASES[0])
    interpreted = PallasOptions(interpret=True)
    with pytest.raises(ValueError, match="causal attention is not supported by the 'splash' kernel"):
        multi_head_attention(q, k, v, 2, causal=True, implementation="splash", pallas=interpreted)
    with jax.default_matmul_precision("high"), pytest.raises(
            ValueError, match="matmul precision 'high' is not available in the Pallas kernel 'pallas'"):
        multi_head_attention(q, k, v, 2, return_probs=True, map_implementation="pallas", pallas=interpreted)


def test_attention_layer_runs_the_kernels_its_compute_names():
    """The layer hands compute.attention, compute.map_attention and the Pallas options to multi_head_attention:
    with the Pallas kernels (interpreted, tiles of 128) it gives our core's output and map."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((1, 200, 64)), jnp.float32)
    context = jnp.asarray(rng.standard_normal((1, 77, 48)), jnp.float32)
    layer = Attention(num_heads=2, head_dim=32)
    params = layer.init(jax.random.key(0), x, context)
    kernels = Attention(num_heads=2, head_dim=32, compute=Compute(
        attention="splash", map_attention="pallas", attention_block_q=128, attention_block_kv=128,
        pallas_interpret=True))
    for maps in (False, True):
        want, want_map = layer.apply(params, x, context, return_probs=maps)
        got, got_map = kernels.apply(params, x, context, return_probs=maps)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
        if maps:
            np.testing.assert_allclose(np.asarray(got_map), np.asarray(want_map), rtol=1e-5, atol=1e-7)
