"""The Triton side of `unclip.kernels.group_norm` (imported lazily: importing this module imports Triton).

Every kernel sees the input as a (B, C, S) array with arbitrary strides (stride_s is 1 for NCHW-contiguous
tensors, stride_c is 1 for channels-last ones), so one set of kernels serves both memory formats; the
wrapper picks tile shapes that keep the unit-stride axis contiguous in each tile.

Variance is never computed as E[x²] − E[x]²: each tile is reduced two-pass in registers (mean, then the sum
of squared deviations), and tiles are merged with the pairwise update of Chan et al.
(n = n_a + n_b, δ = mean_b − mean_a, M2 = M2_a + M2_b + δ²·n_a·n_b/n).
"""
import triton
import triton.language as tl


@triton.jit
def _normalize_and_store(x, mean, rstd, b, ch, c_ok, s_idx, s_ok,
                         Y, W, Bias, Scale, Shift,
                         stride_yb, stride_yc, stride_ys, stride_scale_b, stride_scale_c,
                         stride_shift_b, stride_shift_c,
                         HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr,
                         SILU: tl.constexpr):
    """y = ((x − mean)·rstd·w + bias)·(1 + scale) + shift, then SiLU; written as (x − mean)·a + c with
    per-channel a, c so each element costs one fused multiply-add. `mean`/`rstd`: scalars or (BLOCK_C,)."""
    a = rstd + tl.zeros_like(ch).to(tl.float32)
    if HAS_W:
        a = a * tl.load(W + ch, mask=c_ok, other=0.0).to(tl.float32)
    c = tl.zeros_like(a)
    if HAS_B:
        c = tl.load(Bias + ch, mask=c_ok, other=0.0).to(tl.float32)
    if HAS_SCALE_SHIFT:
        one_plus = 1.0 + tl.load(Scale + b * stride_scale_b + ch * stride_scale_c, mask=c_ok, other=0.0).to(tl.float32)
        shift = tl.load(Shift + b * stride_shift_b + ch * stride_shift_c, mask=c_ok, other=0.0).to(tl.float32)
        a = a * one_plus
        c = c * one_plus + shift
    y = (x - mean) * a[:, None] + c[:, None]
    if SILU:
        y = y * tl.sigmoid(y)
    ptrs = Y + b * stride_yb + ch[:, None] * stride_yc + s_idx[None, :] * stride_ys
    tl.store(ptrs, y.to(Y.dtype.element_ty), mask=c_ok[:, None] & s_ok[None, :])


@triton.jit
def group_norm_whole_group_kernel(
    X, Y, W, Bias, Scale, Shift,
    stride_xb, stride_xc, stride_xs, stride_yb, stride_yc, stride_ys,
    stride_scale_b, stride_scale_c, stride_shift_b, stride_shift_c,
    num_groups, channels_per_group, spatial, group_numel, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Small groups: one program holds a whole (batch, group) in registers, so x is read once and y
    written once (statistics exact two-pass over the registers)."""
    pid = tl.program_id(0)
    b = (pid // num_groups).to(tl.int64)
    g = pid % num_groups
    cs = tl.arange(0, BLOCK_C)
    s_idx = tl.arange(0, BLOCK_S)
    c_ok = cs < channels_per_group
    s_ok = s_idx < spatial
    ok = c_ok[:, None] & s_ok[None, :]
    ch = g * channels_per_group + cs
    x = tl.load(X + b * stride_xb + ch[:, None] * stride_xc + s_idx[None, :] * stride_xs,
                mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(x, 1), 0) / group_numel
    dev = tl.where(ok, x - mean, 0.0)
    var = tl.sum(tl.sum(dev * dev, 1), 0) / group_numel
    rstd = 1.0 / tl.sqrt(var + eps)
    _normalize_and_store(x, mean, rstd, b, ch, c_ok, s_idx, s_ok, Y, W, Bias, Scale, Shift,
                         stride_yb, stride_yc, stride_ys, stride_scale_b, stride_scale_c,
                         stride_shift_b, stride_shift_c, HAS_W, HAS_B, HAS_SCALE_SHIFT, SILU)


@triton.jit
def _split_program(pid, num_c_blocks, num_chunks):
    """1-D program id -> (batch, channel block, spatial chunk), chunk fastest."""
    chunk = pid % num_chunks
    rest = pid // num_chunks
    return (rest // num_c_blocks).to(tl.int64), rest % num_c_blocks, chunk


@triton.jit
def group_norm_partial_stats_kernel(
    X, PART_MEAN, PART_M2,
    stride_xb, stride_xc, stride_xs,
    channels, spatial, num_c_blocks, num_chunks, chunk_len,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Large groups, pass 1: per-channel mean and M2 (sum of squared deviations) of one spatial chunk,
    written to PART_*[b, c, chunk] (fp32)."""
    b, cb, chunk = _split_program(tl.program_id(0), num_c_blocks, num_chunks)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = ch < channels
    s_begin = chunk * chunk_len
    s_end = tl.minimum(spatial, s_begin + chunk_len)
    x_base = X + b * stride_xb + ch[:, None] * stride_xc
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        s_idx = s0 + tl.arange(0, BLOCK_S)
        s_ok = s_idx < s_end
        x = tl.load(x_base + s_idx[None, :] * stride_xs, mask=c_ok[:, None] & s_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        tile_n = tl.minimum(s_end - s0, BLOCK_S).to(tl.float32)
        tile_mean = tl.sum(x, 1) / tile_n
        dev = tl.where(s_ok[None, :], x - tile_mean[:, None], 0.0)
        tile_m2 = tl.sum(dev * dev, 1)
        count = (s0 - s_begin).to(tl.float32)  # elements merged so far (every earlier tile was full)
        new_count = count + tile_n
        delta = tile_mean - mean
        mean = mean + delta * (tile_n / new_count)
        m2 = m2 + tile_m2 + delta * delta * (count * tile_n / new_count)
    out = (b * channels + ch) * num_chunks + chunk
    tl.store(PART_MEAN + out, mean, mask=c_ok)
    tl.store(PART_M2 + out, m2, mask=c_ok)


@triton.jit
def group_norm_finalize_kernel(
    PART_MEAN, PART_M2, MEAN, RSTD,
    num_groups, channels_per_group, spatial, num_chunks, chunk_len, group_numel, eps,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Large groups, pass 2 (tiny): merge a group's per-channel, per-chunk partials into its mean and
    1/sqrt(var + eps). Two sweeps over the partials: the group mean, then Σ M2_i + n_i·(mean_i − mean)²."""
    pid = tl.program_id(0)  # = b * num_groups + g; the group's channels are contiguous in PART_*
    base = pid.to(tl.int64) * channels_per_group * num_chunks
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < num_chunks
    counts = tl.where(k_ok, tl.minimum(chunk_len, spatial - ks * chunk_len), 0).to(tl.float32)

    weighted = tl.zeros([BLOCK_C, BLOCK_K], tl.float32)
    for c0 in range(0, channels_per_group, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = (cs < channels_per_group)[:, None] & k_ok[None, :]
        m = tl.load(PART_MEAN + base + cs[:, None] * num_chunks + ks[None, :], mask=ok, other=0.0)
        weighted += m * counts[None, :]
    mean = tl.sum(tl.sum(weighted, 1), 0) / group_numel

    m2 = tl.zeros([BLOCK_C, BLOCK_K], tl.float32)
    for c0 in range(0, channels_per_group, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ok = (cs < channels_per_group)[:, None] & k_ok[None, :]
        offs = base + cs[:, None] * num_chunks + ks[None, :]
        d = tl.load(PART_MEAN + offs, mask=ok, other=0.0) - mean
        m2 += tl.load(PART_M2 + offs, mask=ok, other=0.0) + tl.where(ok, d * d * counts[None, :], 0.0)
    var = tl.sum(tl.sum(m2, 1), 0) / group_numel
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def group_norm_apply_kernel(
    X, Y, W, Bias, Scale, Shift, MEAN, RSTD,
    stride_xb, stride_xc, stride_xs, stride_yb, stride_yc, stride_ys,
    stride_scale_b, stride_scale_c, stride_shift_b, stride_shift_c,
    channels, spatial, num_groups, channels_per_group, num_c_blocks, num_chunks, chunk_len,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SCALE_SHIFT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Large groups, pass 3: normalise + affine + scale-shift + SiLU of one (channel block, chunk).
    Programs run in the reverse order of the statistics pass, so the first tiles re-read here are the
    last ones that pass read (the likeliest still in L2)."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    b, cb, chunk = _split_program(pid, num_c_blocks, num_chunks)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = ch < channels
    stat = b * num_groups + ch // channels_per_group
    mean = tl.load(MEAN + stat, mask=c_ok, other=0.0)
    rstd = tl.load(RSTD + stat, mask=c_ok, other=0.0)
    s_begin = chunk * chunk_len
    s_end = tl.minimum(spatial, s_begin + chunk_len)
    x_base = X + b * stride_xb + ch[:, None] * stride_xc
    for s0 in range(s_begin, s_end, BLOCK_S):
        s_idx = s0 + tl.arange(0, BLOCK_S)
        s_ok = s_idx < s_end
        x = tl.load(x_base + s_idx[None, :] * stride_xs, mask=c_ok[:, None] & s_ok[None, :], other=0.0)
        _normalize_and_store(x.to(tl.float32), mean[:, None], rstd, b, ch, c_ok, s_idx, s_ok,
                             Y, W, Bias, Scale, Shift,
                             stride_yb, stride_yc, stride_ys, stride_scale_b, stride_scale_c,
                             stride_shift_b, stride_shift_c, HAS_W, HAS_B, HAS_SCALE_SHIFT, SILU)
