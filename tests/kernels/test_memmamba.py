"""MemMamba note pool kernels: selection and compaction, the FIFO window, the three torch forms
of the note read, and the Triton kernels (interpreter, fp32) against the fp64 oracle."""

import pytest
import torch

from memzoo.kernels.memmamba import (
    compact_notes,
    note_attention,
    note_attention_step,
    pool_window,
    pool_write,
    select_notes,
)
from memzoo.kernels.memmamba.reference import (
    note_attention_chunked,
    note_attention_recurrent,
    note_attention_ref,
)
from memzoo.kernels.testing import TEST_DEVICE, assert_close, cu_seqlens_from_lengths, randn


def scores_for(B, T, density, seed):
    """Scores in (0, 1) whose fraction above 0.5 is about `density` (0 and 1 exactly)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(B, T, generator=generator, dtype=torch.float64, device="cpu")
    return torch.where(u < density, 0.5 + u / 4 + 0.01, 0.25 * u).to(TEST_DEVICE)


def make_case(B, T, H, D, Dv, density, seed):
    """(q, per-token k, per-token v, scores) in fp64."""
    return (
        randn(B, T, H, D, seed=seed, dtype=torch.float64),
        randn(B, T, H, D, seed=seed + 1, dtype=torch.float64),
        randn(B, T, H, Dv, seed=seed + 2, dtype=torch.float64),
        scores_for(B, T, density, seed + 3),
    )


# ---------------------------------------------------------------------------------------------
# select_notes and the pool helpers


@pytest.mark.parametrize("B,T,density", [(2, 37, 0.5), (1, 1, 1.0), (3, 9, 0.0)],
                         ids=["B2-T37-half", "B1-T1-all", "B3-T9-none"])  # fmt: skip
def test_select_notes_counts_positions_and_totals_are_exact(B, T, density):
    scores = scores_for(B, T, density, seed=B + T)
    sel = select_notes(scores, 0.5)
    assert sel.counts.dtype == sel.positions.dtype == sel.totals.dtype == torch.int32
    for b in range(B):
        chosen = [t for t in range(T) if scores[b, t] > 0.5]
        assert sel.counts[b].tolist() == [sum(s < t for s in chosen) for t in range(T)]
        assert sel.positions[b].tolist() == chosen + [T] * (T - len(chosen))
        assert int(sel.totals[b]) == len(chosen)


def test_compact_notes_puts_selected_notes_in_rank_order():
    notes = randn(2, 11, 3, seed=0)
    sel = select_notes(scores_for(2, 11, 0.5, seed=1), 0.5)
    compact = compact_notes(notes, sel.positions)
    for b in range(2):
        n = int(sel.totals[b])
        assert torch.equal(compact[b, :n], notes[b, sel.positions[b, :n].long()])


def test_compact_notes_after_a_pool_window_continues_the_ranks():
    notes, prefix = randn(2, 6, 4, seed=0), randn(2, 5, 4, seed=1)
    valid = torch.tensor([2, 5])
    sel = select_notes(scores_for(2, 6, 0.5, seed=2), 0.5)
    compact = compact_notes(notes, sel.positions, prefix=prefix, prefix_valid=valid)
    assert compact.shape == (2, 11, 4)
    for b in range(2):
        v, n = int(valid[b]), int(sel.totals[b])
        assert torch.equal(compact[b, :v], prefix[b, :v])
        assert torch.equal(compact[b, v : v + n], notes[b, sel.positions[b, :n].long()])


@pytest.mark.parametrize("K,chunks", [(4, (3, 1, 1, 6, 1)), (1, (2, 1)), (8, (5,))],
                         ids=["K4-chunks3.1.1.6.1", "K1-chunks2.1", "K8-chunk5"])  # fmt: skip
def test_pool_keeps_the_last_k_selected_notes_in_time_order(K, chunks):
    T = sum(chunks)
    notes = torch.arange(1, T + 1, dtype=torch.float64).view(1, T, 1).repeat(2, 1, 1)
    selected = scores_for(2, T, 0.6, seed=K) > 0.5
    pool, count = torch.zeros(2, K, 1, dtype=torch.float64), torch.zeros(2, dtype=torch.long)
    start = 0
    for n in chunks:
        chunk = slice(start, start + n)
        pool, count = pool_write(pool, count, notes[:, chunk], selected[:, chunk])
        start += n
    window, valid = pool_window(pool, count)
    for b in range(2):
        written = [t + 1.0 for t in range(T) if selected[b, t]]
        assert int(count[b]) == len(written)
        assert window[b, : int(valid[b]), 0].tolist() == written[-K:]


# ---------------------------------------------------------------------------------------------
# The torch forms of the read agree, and the window is exactly the last K notes before t


def case_id(B, T, H, D, Dv, K, density, lengths=None):
    return f"B{B}-T{T}-H{H}-D{D}-Dv{Dv}-K{K}-p{density}" + ("-varlen" if lengths else "")


FORMS = [
    (2, 37, 2, 16, 16, 5, 0.5),
    (1, 63, 1, 20, 12, 1, 0.7),
    (2, 30, 3, 8, 8, 64, 0.5),
    (1, 1, 1, 8, 8, 4, 1.0),
    (2, 25, 2, 8, 8, 3, 1.0),
    (2, 12, 1, 8, 8, 3, 0.0),
]


@pytest.mark.parametrize("B,T,H,D,Dv,K,density", FORMS, ids=[case_id(*c) for c in FORMS])
def test_chunked_and_recurrent_forms_equal_the_dense_oracle(B, T, H, D, Dv, K, density):
    q, k, v, scores = make_case(B, T, H, D, Dv, density, seed=T + K)
    sel = select_notes(scores, 0.5)
    kc, vc = compact_notes(k, sel.positions), compact_notes(v, sel.positions)
    scale = D**-0.5
    o_ref, lse_ref = note_attention_ref(q, kc, vc, sel.counts, K, scale)
    for chunk in (1, 7, 64):
        o, lse = note_attention_chunked(q, kc, vc, sel.counts, K, scale, chunk=chunk)
        assert_close(f"chunked C={chunk}", o_ref, o, 1e-12)
        assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
        finite = torch.isfinite(lse_ref)
        assert_close("lse", lse_ref[finite], lse[finite], 1e-12)
    o_rec, lse_rec = note_attention_recurrent(q, k, v, scores > 0.5, K, scale)
    assert_close("recurrent", o_ref, o_rec, 1e-12)
    assert torch.equal(torch.isinf(lse_rec), torch.isinf(lse_ref))


@pytest.mark.parametrize("K", [1, 4, 6], ids=lambda K: f"K{K}")
def test_a_token_sees_exactly_the_last_k_notes_written_before_it(K):
    """q = 0 makes the read a plain mean of the visible values; one-hot values name the ranks."""
    T = 14
    scores = scores_for(1, T, 0.6, seed=K)
    sel = select_notes(scores, 0.5)
    S = T
    q = torch.zeros(1, T, 1, 4, dtype=torch.float64)
    k = randn(1, S, 1, 4, seed=0, dtype=torch.float64)
    v = torch.eye(S, dtype=torch.float64).view(1, S, 1, S)
    o = note_attention(q, k, v, sel.counts, K)
    for t in range(T):
        c = int(sel.counts[0, t])
        expected = set(range(max(0, c - K), c))
        seen = {r for r in range(S) if o[0, t, 0, r] > 0}
        assert seen == expected, f"token {t}"
        if expected:
            assert_close(f"mean at {t}", torch.full((len(expected),), 1.0 / len(expected),
                                                    dtype=torch.float64),
                         o[0, t, 0, sorted(expected)], 1e-14)  # fmt: skip


def test_notes_of_token_t_or_later_are_invisible_at_t():
    q, k, v, scores = make_case(1, 20, 2, 8, 8, 0.6, seed=3)
    sel = select_notes(scores, 0.5)
    kc, vc = compact_notes(k, sel.positions), compact_notes(v, sel.positions)
    o = note_attention(q, kc, vc, sel.counts, 4)
    t = 11
    later = sel.counts[0, t].item()  # ranks >= counts[t] belong to tokens t, t + 1, ...
    k2, v2 = kc.clone(), vc.clone()
    k2[:, later:] += 5.0
    v2[:, later:] -= 3.0
    o2 = note_attention(q, k2, v2, sel.counts, 4)
    assert torch.equal(o[:, : t + 1], o2[:, : t + 1])
    assert not torch.equal(o[:, t + 1 :], o2[:, t + 1 :])


def test_a_token_with_no_visible_note_reads_zero_with_finite_gradients():
    q, k, v, _ = make_case(2, 6, 1, 8, 8, 0.0, seed=4)
    counts = torch.tensor([[0, 0, 0, 1, 2, 2], [0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    q.requires_grad_()
    o, lse = note_attention(q, k, v, counts, 3, return_lse=True)
    assert torch.equal(o[1], torch.zeros_like(o[1]))
    assert torch.equal(o[0, :3], torch.zeros_like(o[0, :3]))
    assert torch.isinf(lse[1]).all() and (lse[1] < 0).all()
    o.sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad[1].abs().sum() == 0


def test_varlen_equals_each_sequence_alone():
    lengths = [9, 1, 14, 6]
    q, k, v, scores = make_case(1, sum(lengths), 2, 8, 8, 0.6, seed=5)
    cu = cu_seqlens_from_lengths(lengths)
    sel = select_notes(scores, 0.5)  # counts run over the whole packed row
    packed = note_attention(
        q, compact_notes(k, sel.positions), compact_notes(v, sel.positions), sel.counts, 3,
        cu_seqlens=cu,
    )  # fmt: skip
    alone = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        s = select_notes(scores[:, start:end], 0.5)
        alone.append(note_attention(
            q[:, start:end], compact_notes(k[:, start:end], s.positions),
            compact_notes(v[:, start:end], s.positions), s.counts, 3,
        ))  # fmt: skip
    assert_close("varlen", torch.cat(alone, dim=1), packed, 1e-12)


def test_step_reads_the_ring_buffer_like_the_full_read():
    q, k, v, scores = make_case(2, 15, 2, 8, 6, 0.7, seed=6)
    selected = scores > 0.5
    sel = select_notes(scores, 0.5)
    kc, vc = compact_notes(k, sel.positions), compact_notes(v, sel.positions)
    full = note_attention(q, kc, vc, sel.counts, 4)
    empty = torch.zeros(2, dtype=torch.long)
    pool_k, count = pool_write(k.new_zeros(2, 4, 2, 8), empty, k[:, :14], selected[:, :14])
    pool_v, _ = pool_write(v.new_zeros(2, 4, 2, 6), empty, v[:, :14], selected[:, :14])
    step = note_attention_step(q[:, 14], pool_k, pool_v, count.clamp(max=4))
    assert_close("step", full[:, 14], step, 1e-12)


# ---------------------------------------------------------------------------------------------
# Triton (interpreter, fp32) against the fp64 oracle, forward and every gradient

TRITON = [
    (2, 37, 2, 16, 16, 5, 0.5, None),
    (1, 70, 1, 32, 32, 8, 0.6, None),
    (2, 19, 1, 20, 12, 3, 1.0, None),
    (1, 9, 2, 16, 16, 64, 0.5, None),
    (2, 7, 1, 16, 16, 2, 0.0, None),
    (1, 40, 2, 16, 16, 4, 0.6, (11, 1, 20, 8)),
]


@pytest.mark.parametrize("B,T,H,D,Dv,K,density,lengths", TRITON, ids=[case_id(*c) for c in TRITON])
def test_triton_matches_reference_forward_and_backward(B, T, H, D, Dv, K, density, lengths):
    q, k, v, scores = make_case(B, T, H, D, Dv, density, seed=T + D)
    sel = select_notes(scores, 0.5)
    inputs = (q, compact_notes(k, sel.positions), compact_notes(v, sel.positions))
    cu = None if lengths is None else cu_seqlens_from_lengths(lengths)
    do = randn(B, T, H, Dv, seed=1, dtype=torch.float64)
    dlse = randn(B, T, H, seed=2, dtype=torch.float64)

    def run(dtype, backend):
        leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
        o, lse = note_attention(*leaves, sel.counts, K, cu_seqlens=cu, return_lse=True,
                                backend=backend)  # fmt: skip
        # The lse gradient is what merging several pools feeds back; -inf rows take none.
        lse_term = torch.where(torch.isfinite(lse), lse.double(), 0.0) * dlse
        ((o.double() * do).sum() + lse_term.sum()).backward()
        return o, lse, [t.grad for t in leaves]

    o, lse, grads = run(torch.float32, "triton")
    o_ref, lse_ref, grads_ref = run(torch.float64, "torch")
    assert o.dtype == torch.float32
    assert_close("o", o_ref, o, 1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    assert_close("lse", lse_ref[finite], lse[finite], 1e-5)
    for name, ref, out in zip(("dq", "dk", "dv"), grads_ref, grads, strict=True):
        assert_close(name, ref, out, 1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_naming_the_argument():
    q, k, v, scores = make_case(1, 6, 1, 8, 8, 1.0, seed=7)
    counts = select_notes(scores, 0.5).counts
    with pytest.raises(TypeError, match="counts must have dtype"):
        note_attention(q, k, v, counts.long(), 2)
    with pytest.raises(ValueError, match="capacity"):
        note_attention(q, k, v, counts, 0)
    with pytest.raises(TypeError, match="v must have q's dtype"):
        note_attention(q, k, v.float(), counts, 2)
    with pytest.raises(ValueError, match="counts must have shape"):
        note_attention(q, k, v, counts[:, :4], 2)
    with pytest.raises(TypeError, match="tau1 must be a float"):
        select_notes(scores, "0.5")
    with pytest.raises(ValueError, match="backend must be one of"):
        note_attention_step(q[:, 0], k, v, torch.tensor([2]), backend="triton")


@pytest.mark.device_assert
def test_bad_counts_raise_naming_the_argument():
    q, k, v, scores = make_case(1, 6, 1, 8, 8, 1.0, seed=7)
    counts = select_notes(scores, 0.5).counts
    with pytest.raises(ValueError, match="grow by 0 or 1"):
        note_attention(q, k, v, counts * 2, 2)
    with pytest.raises(ValueError, match="S=3 notes"):
        note_attention(q, k[:, :3], v[:, :3], counts, 2)
