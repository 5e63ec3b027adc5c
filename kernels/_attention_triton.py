"""The Triton side of `unclip.kernels.attention` (imported lazily: importing this module imports Triton).

Kept apart from attention.py so that `import unclip.kernels` never needs Triton, and so that the choice
between compiled kernels and the CPU interpreter (TRITON_INTERPRET=1, read when `@triton.jit` runs) is made
when a kernel is first requested, not when the package is imported.
"""
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, EXACT_FP32: tl.constexpr, UPCAST: tl.constexpr):
    """a·b with an fp32 result. fp32 operands use IEEE fp32 (not TF32). UPCAST multiplies fp16/bf16
    operands as fp32 (same products, they are exact in fp32): only for Triton's CPU interpreter, whose
    bf16 dot is wrong (triton 3.9); compiled kernels use the tensor-core dot."""
    if EXACT_FP32:
        return tl.dot(a, b, input_precision="ieee")
    elif UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def attention_forward_kernel(
    Q, K, V, O, KEEP,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_keep_b, stride_keep_n,
    num_heads, len_q, len_k, head_dim,
    qk_scale_log2,  # softmax scale · log2(e): the softmax is evaluated with exp2
    CAUSAL: tl.constexpr, HAS_KEEP: tl.constexpr, EXACT_FP32: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head); streams over the keys in BLOCK_N blocks,
    keeping a running row maximum `m`, row sum `l` and un-normalised output `acc`, all in fp32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # int64: batch offsets of big tensors overflow int32
    h = (pid_bh % num_heads).to(tl.int64)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_in_block = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < len_q
    dim_ok = dims < head_dim  # head dims that are not a power of two are padded with masked zeros

    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    end_n = len_k
    if CAUSAL:  # keys past this block's last row are invisible to every row of the block
        end_n = tl.minimum(len_k, (pid_m + 1) * BLOCK_M)
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + cols_in_block
        col_ok = cols < len_k
        # K is loaded transposed, (BLOCK_D, BLOCK_N), so q·kᵀ is a plain dot
        k = tl.load(k_base + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
                    mask=dim_ok[:, None] & col_ok[None, :], other=0.0)
        s = _dot(q, k, EXACT_FP32, UPCAST_DOT) * qk_scale_log2

        visible = col_ok[None, :]  # (1, BLOCK_N); broadcasts to (BLOCK_M, BLOCK_N) below
        if HAS_KEEP:
            keep = tl.load(KEEP + b * stride_keep_b + cols * stride_keep_n, mask=col_ok, other=0)
            visible = visible & (keep != 0)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None])
        s = tl.where(visible, s, float("-inf"))  # broadcast keeps the (BLOCK_M, BLOCK_N) shape of s

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtracting 0 instead of -inf keeps
        # exp2(-inf - m) = 0 rather than NaN, so such rows stay at l = 0, acc = 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)

        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        # fp16/bf16: p is rounded to the input dtype for the tensor-core dot, as flash attention does
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, EXACT_FP32, UPCAST_DOT)
        m_i = m_new

    # Rows with no visible key at all (every key padded, or causal with key 0 padded) output zeros.
    has_any = l_i > 0.0
    out = acc / tl.where(has_any, l_i, 1.0)[:, None]
    out = tl.where(has_any[:, None], out, 0.0)
    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
