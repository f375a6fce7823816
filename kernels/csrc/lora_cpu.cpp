// Short-segment LoRA for the CPU: y[t] += (x[t] · A[o:o+r]ᵀ) · B[o:o+r] for every token t of every segment,
// in one call per module (semantics: kernels.lora.sgmv_lora_reference). Registered as the torch op
// hotswap::lora_segments, so the eager path and graphs compiled by torch.compile both call it.
//
// Why a kernel of our own: a decode step over many adapters is, per module, ~20 short segments of 1-3
// tokens. ATen needs ~6 ops for that (gather x, gather A rows, bmm, pick h, embedding_bag over B, add),
// each with its fixed cost, plus a copy of the gathered rows. Here each segment's rank rows are read
// once, straight from the pool (float32 or bfloat16, widened in registers), against the segment's
// tokens, which stay in L1; the next segment's rows are prefetched while this one computes (the rows
// of ~20 adapters are scattered over the pools: without it the loads wait on memory latency), and
// segments are spread over the threads.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

inline float widen(float v) { return v; }
inline float widen(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

constexpr int64_t kTokens = 32;  // tokens of a segment computed together (longer segments: in chunks)
constexpr int64_t kMaxRank = 256;

inline void prefetch_rows(const char* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 0);
}

template <typename P>
void segments(float* y, int64_t ys, const float* x, int64_t xs, const P* a, const P* b, int64_t d_in,
              int64_t d_out, const int64_t* seg, int64_t begin, int64_t end) {
  float h[kTokens * kMaxRank];
  for (int64_t s = begin; s < end; ++s) {
    const int64_t t_begin = seg[4 * s], t_end = seg[4 * s + 1], o = seg[4 * s + 2], r = seg[4 * s + 3];
    if (s + 1 < end && seg[4 * s + 7] > 0) {  // the next segment's rows, on their way while this one computes
      prefetch_rows(reinterpret_cast<const char*>(a + seg[4 * s + 6] * d_in), seg[4 * s + 7] * d_in * sizeof(P));
      prefetch_rows(reinterpret_cast<const char*>(b + seg[4 * s + 6] * d_out), seg[4 * s + 7] * d_out * sizeof(P));
    }
    for (int64_t t0 = t_begin; t0 < t_end; t0 += kTokens) {
      const int64_t n = std::min(kTokens, t_end - t0);
      // shrink: four A rows at a time (four independent sums: one would wait on each FMA's latency)
      int64_t j = 0;
      for (; j + 4 <= r; j += 4) {
        const P *r0 = a + (o + j) * d_in, *r1 = r0 + d_in, *r2 = r1 + d_in, *r3 = r2 + d_in;
        for (int64_t t = 0; t < n; ++t) {
          const float* xt = x + (t0 + t) * xs;
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
          for (int64_t k = 0; k < d_in; ++k) {
            const float v = xt[k];
            s0 += v * widen(r0[k]);
            s1 += v * widen(r1[k]);
            s2 += v * widen(r2[k]);
            s3 += v * widen(r3[k]);
          }
          float* ht = h + t * r + j;
          ht[0] = s0, ht[1] = s1, ht[2] = s2, ht[3] = s3;
        }
      }
      for (; j < r; ++j) {
        const P* row = a + (o + j) * d_in;
        for (int64_t t = 0; t < n; ++t) {
          const float* xt = x + (t0 + t) * xs;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < d_in; ++k) acc += xt[k] * widen(row[k]);
          h[t * r + j] = acc;
        }
      }
      // expand: four B rows at a time into each output row (a quarter of the passes over y)
      for (j = 0; j + 4 <= r; j += 4) {
        const P *r0 = b + (o + j) * d_out, *r1 = r0 + d_out, *r2 = r1 + d_out, *r3 = r2 + d_out;
        for (int64_t t = 0; t < n; ++t) {
          float* yt = y + (t0 + t) * ys;
          const float *ht = h + t * r + j, w0 = ht[0], w1 = ht[1], w2 = ht[2], w3 = ht[3];
#pragma omp simd
          for (int64_t k = 0; k < d_out; ++k) yt[k] += w0 * widen(r0[k]) + w1 * widen(r1[k]) + w2 * widen(r2[k]) + w3 * widen(r3[k]);
        }
      }
      for (; j < r; ++j) {
        const P* row = b + (o + j) * d_out;
        for (int64_t t = 0; t < n; ++t) {
          float* yt = y + (t0 + t) * ys;
          const float w = h[t * r + j];
#pragma omp simd
          for (int64_t k = 0; k < d_out; ++k) yt[k] += w * widen(row[k]);
        }
      }
    }
  }
}

// y [T, d_out] float32 (rows may be strided, columns contiguous; updated in place), x [T, d_in] float32
// (same), lora_a [N, d_in] and lora_b [N, d_out] contiguous, both float32 or both bfloat16, seg [S, 4]
// int64 rows (tok_start, tok_end, row_start, rank); a row with no tokens or rank 0 is skipped (padding).
void lora_segments(const at::Tensor& y, const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b, const at::Tensor& seg) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && y.scalar_type() == at::kFloat, "x and y must be float32");
  TORCH_CHECK(lora_a.scalar_type() == lora_b.scalar_type(), "the pools must share a dtype");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0) && x.stride(1) == 1 && y.stride(1) == 1, "x, y: [T, d] with contiguous rows");
  TORCH_CHECK(lora_a.dim() == 2 && lora_b.dim() == 2 && lora_a.size(1) == x.size(1) && lora_b.size(1) == y.size(1) &&
              lora_a.size(0) == lora_b.size(0) && lora_a.is_contiguous() && lora_b.is_contiguous(), "pools: [N, d_in], [N, d_out], contiguous");
  TORCH_CHECK(seg.scalar_type() == at::kLong && seg.is_contiguous() && seg.dim() == 2 && seg.size(1) == 4, "seg: [S, 4] int64");
  const int64_t S = seg.size(0), T = x.size(0), N = lora_a.size(0);
  const int64_t* sp = seg.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {  // padding rows become (0, 0, 0, 0): prefetching them reads nothing
    const int64_t t0 = sp[4 * s], t1 = sp[4 * s + 1], o = sp[4 * s + 2], r = sp[4 * s + 3];
    TORCH_CHECK(0 <= t0 && t0 <= t1 && t1 <= T && 0 <= r && r <= kMaxRank && 0 <= o && o + r <= N, "segment ", s, " out of range");
  }
  if (S == 0) return;
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  auto run = [&](auto* a, auto* b) {
    at::parallel_for(0, S, 1, [&](int64_t begin, int64_t end) {
      segments(yp, y.stride(0), xp, x.stride(0), a, b, x.size(1), y.size(1), sp, begin, end);
    });
  };
  if (lora_a.scalar_type() == at::kBFloat16) {
    run(lora_a.data_ptr<c10::BFloat16>(), lora_b.data_ptr<c10::BFloat16>());
  } else {
    TORCH_CHECK(lora_a.scalar_type() == at::kFloat, "pools must be float32 or bfloat16");
    run(lora_a.data_ptr<float>(), lora_b.data_ptr<float>());
  }
}

}  // namespace

TORCH_LIBRARY(hotswap, m) {
  m.def("lora_segments(Tensor(a!) y, Tensor x, Tensor lora_a, Tensor lora_b, Tensor seg) -> ()");
}

TORCH_LIBRARY_IMPL(hotswap, CPU, m) {
  m.impl("lora_segments", &lora_segments);
}
