#include "common/kernels/cpu/narrow_linear.h"

// GCC 12 reports its own AVX-512 headers (_mm512_undefined_ps in the masked loads and
// reductions) as reading uninitialised values: a known false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/base/status_macros.h"

#include "common/kernels/cpu/threads.h"
#include "common/kernels/cpu_ops.h"
#include "common/model/numeric.h"

namespace splitmoe::kernels {
namespace {

using model::Matrix;
using model::WeightDType;

// The fp8 scale row of weight row r.
const float* ScaleRow(const Matrix& w, int64_t r) {
  return w.scale_inv.data() + (r / model::kFp8BlockSize) * w.scale_cols();
}

// ---- Portable: one value at a time, the loader's own conversions.

void WidenRowPortable(const Matrix& w, int64_t r, float* out) {
  const int64_t k = w.cols;
  if (w.dtype == WeightDType::kBFloat16) {
    const uint8_t* p = w.raw + r * k * 2;
    for (int64_t c = 0; c < k; ++c) {
      uint16_t bits;
      std::memcpy(&bits, p + 2 * c, 2);
      out[c] = model::Bf16ToFloat(bits);
    }
  } else {
    const uint8_t* p = w.raw + r * k;
    const float* s = ScaleRow(w, r);
    for (int64_t c = 0; c < k; ++c)
      out[c] = model::Fp8E4M3ToFloat(p[c]) * s[c / model::kFp8BlockSize];
  }
}

// ---- AVX-512: 16 values at a time.

#define SPLITMOE_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

SPLITMOE_AVX512 inline __mmask16 TailMask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

SPLITMOE_AVX512 inline __m512 LoadBf16(const uint8_t* p, __mmask16 m) {
  const __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// E4M3 "fn" to fp32 divided by 2^8, exactly: the byte's magnitude bits moved into an fp16 (sign to
// bit 15, the 4 exponent and 3 mantissa bits to the fp16's low exponent and high mantissa bits)
// is the E4M3 value times 2^-8 (the biases are 7 and 15), subnormals included; vcvtph2ps widens it
// exactly. 0x7f/0xff (NaN in E4M3 "fn") read as 480/256 here: LoadFp8Over256 sets them to NaN,
// the streams note them (RowReader). Callers
// multiply by the block scale times 2^8 (exact: a power of two), which rounds the same product
// once, as model::Fp8E4M3ToFloat(code) * scale does.
SPLITMOE_AVX512 inline __m512 Fp8CodesOver256(__m128i b) {
  __m256i h = _mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8);  // sign at 15, magnitude at 8..14
  h = _mm256_and_si256(_mm256_srai_epi16(h, 1), _mm256_set1_epi16(static_cast<short>(0xbfff)));
  return _mm512_cvtph_ps(h);
}

// The lanes of b holding a NaN code (0x7f, 0xff).
SPLITMOE_AVX512 inline __mmask16 Fp8NanCodes(__m128i b) {
  return _mm_cmpeq_epi8_mask(_mm_and_si128(b, _mm_set1_epi8(0x7f)), _mm_set1_epi8(0x7f));
}

SPLITMOE_AVX512 inline __m512 LoadFp8Over256(const uint8_t* p, __mmask16 m) {
  const __m128i b = _mm_maskz_loadu_epi8(m, p);
  const __m512 v = Fp8CodesOver256(b);
  const __mmask16 nan = Fp8NanCodes(b);
  // NaN with the code's sign, as the scalar table gives (0xff is -NaN).
  const __m512 signed_nan = _mm512_or_ps(_mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()),
                                         _mm512_and_ps(v, _mm512_set1_ps(-0.0f)));
  return _mm512_mask_mov_ps(v, nan, signed_nan);
}

// 16 weight values of a row starting at column c, widened (and scaled: fp8).
template <WeightDType D>
SPLITMOE_AVX512 inline __m512 LoadW(const uint8_t* row, const float* srow, int64_t c,
                                    __mmask16 m) {
  if constexpr (D == WeightDType::kBFloat16) {
    return LoadBf16(row + 2 * c, m);
  } else {
    return _mm512_mul_ps(LoadFp8Over256(row + c, m),
                         _mm512_set1_ps(srow[c / model::kFp8BlockSize] * 256.0f));
  }
}

// A weight row as the streaming kernels read it: 16 values at a time, in column order from
// column 0 (every step once). FP8 takes its block's scale (times 2^8) once per 128 columns and
// does not patch NaN codes value by value: it notes them (`nan`), and Finish() makes the row's
// product NaN, which is what the patched values would have summed to (NaN times anything). That
// is 4 instructions fewer per 16 values, in a loop that is compute-bound for FP8 on 2 cores.
template <WeightDType D>
struct RowReader {
  const uint8_t* row;
  const float* srow;  // FP8: the row's block scales
  __m512 scale256;
  __mmask16 nan = 0;

  RowReader() = default;
  SPLITMOE_AVX512 RowReader(const Matrix& w, int64_t r)
      : row(w.raw + r * w.cols * model::WeightDTypeBytes(D)),
        srow(D == WeightDType::kFp8E4M3 ? ScaleRow(w, r) : nullptr),
        scale256(_mm512_setzero_ps()) {}

  SPLITMOE_AVX512 inline __m512 Load(int64_t c, __mmask16 m) {
    if constexpr (D == WeightDType::kBFloat16) {
      return LoadBf16(row + 2 * c, m);
    } else {
      if ((c & (model::kFp8BlockSize - 1)) == 0)
        scale256 = _mm512_set1_ps(srow[c / model::kFp8BlockSize] * 256.0f);
      const __m128i b = _mm_maskz_loadu_epi8(m, row + c);
      nan |= Fp8NanCodes(b);
      return _mm512_mul_ps(Fp8CodesOver256(b), scale256);
    }
  }

  float Finish(float sum) const {
    return D == WeightDType::kFp8E4M3 && nan != 0 ? std::numeric_limits<float>::quiet_NaN() : sum;
  }
};

template <WeightDType D>
SPLITMOE_AVX512 void WidenRowAvx512(const Matrix& w, int64_t r, float* out) {
  const int64_t k = w.cols;
  const uint8_t* row = w.raw + r * k * model::WeightDTypeBytes(D);
  const float* srow = D == WeightDType::kFp8E4M3 ? ScaleRow(w, r) : nullptr;
  for (int64_t c = 0; c < k; c += 16) {
    const __mmask16 m = TailMask(k - c);
    _mm512_mask_storeu_ps(out + c, m, LoadW<D>(row, srow, c, m));
  }
}

// y[i, j] = x[i, :] . w[r0 + j, :] for j < R, i < MB: R weight rows against MB rows of x, each
// weight value read once from memory and used MB times while in a register. The tile's rows
// are read side by side, a pattern the hardware prefetchers follow poorly, so the tile asks for
// the NEXT tile's bytes (the R rows after these: adjacent in memory) front to back as it goes,
// one sequential stream a tile ahead: at M = 4-16 this read the weight 1.3-1.7x faster than
// asking for each row's bytes a few lines ahead (bench/ on the machines of docs/performance.md).
template <WeightDType D, int R, int MB>
SPLITMOE_AVX512 void StreamTile(const float* x, int64_t ldx, const Matrix& w, int64_t r0,
                                float* y, int64_t ldy) {
  const int64_t k = w.cols;
  constexpr int64_t kBytes = model::WeightDTypeBytes(D);
  const int64_t row_bytes = k * kBytes;
  RowReader<D> rows[R];
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j) rows[j] = RowReader<D>(w, r0 + j);
  // The next tile, R rows of row_bytes, asked for at R * 16 values' bytes a step: all of it
  // but its last k % 16 columns' bytes by the time this tile is done.
  const char* next = reinterpret_cast<const char*>(w.raw + (r0 + R) * row_bytes);
  constexpr int64_t kNextBytesPerStep = R * 16 * kBytes;
  // Every loop over R and MB is unrolled so the accumulators live in registers.
  __m512 acc[R][MB];
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_setzero_ps();
  const int64_t full = k / 16 * 16;
  for (int64_t c = 0; c < full; c += 16) {
#pragma GCC unroll 8
    for (int64_t b = 0; b < kNextBytesPerStep; b += 64)
      _mm_prefetch(next + c * R * kBytes + b, _MM_HINT_T0);
    __m512 xv[MB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_loadu_ps(x + i * ldx + c);
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const __m512 wv = rows[j].Load(c, static_cast<__mmask16>(0xffff));
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_fmadd_ps(wv, xv[i], acc[j][i]);
    }
  }
  if (full < k) {
    const __mmask16 m = TailMask(k - full);
    __m512 xv[MB];
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) xv[i] = _mm512_maskz_loadu_ps(m, x + i * ldx + full);
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const __m512 wv = rows[j].Load(full, m);
#pragma GCC unroll 8
      for (int i = 0; i < MB; ++i) acc[j][i] = _mm512_fmadd_ps(wv, xv[i], acc[j][i]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 8
    for (int i = 0; i < MB; ++i) y[i * ldy + j] = rows[j].Finish(_mm512_reduce_add_ps(acc[j][i]));
}

// y[i, j] = x[i, :] . w[r0 + j, :] for j < R, i < m.
template <WeightDType D, int R>
SPLITMOE_AVX512 void StreamRows(const float* x, int64_t ldx, int64_t m, const Matrix& w,
                                int64_t r0, float* y, int64_t ldy) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) StreamTile<D, R, 4>(x + i * ldx, ldx, w, r0, y + i * ldy, ldy);
  switch (m - i) {
    case 3:
      StreamTile<D, R, 3>(x + i * ldx, ldx, w, r0, y + i * ldy, ldy);
      break;
    case 2:
      StreamTile<D, R, 2>(x + i * ldx, ldx, w, r0, y + i * ldy, ldy);
      break;
    case 1:
      StreamTile<D, R, 1>(x + i * ldx, ldx, w, r0, y + i * ldy, ldy);
      break;
    default:
      break;
  }
}

// How far ahead of its reads a one-row stream asks for the weight, in bytes.
constexpr int64_t kRowPrefetchBytes = 1024;

// ya = x . w[ra, :] and yb = x . w[rb, :] for ONE row of x: two weight rows far apart (two
// halves of a thread's run), each read front to back, 16 values a step into one accumulator
// each: the same sums, in the same order, as StreamTile's (so a row's result does not depend
// on how many rows of x came with it, up to the streaming bound (kBf16StreamMaxRows BF16,
// kNarrowStreamMaxRows FP8): decode at batch 1 equals batch 8 and a speculative verification
// pass). At M = 1 this read the weight at 1.2-1.6x StreamTile's rate on the
// machines of docs/performance.md: a tile's rows are 2 KiB apart, within one page, where the
// prefetchers follow one stream per page; two streams in different pages were ~10% faster
// than one.
template <WeightDType D>
SPLITMOE_AVX512 void StreamRowPair(const float* x, const Matrix& w, int64_t ra, int64_t rb,
                                   float* ya, float* yb) {
  const int64_t k = w.cols;
  constexpr int64_t kBytes = model::WeightDTypeBytes(D);
  RowReader<D> a(w, ra), b(w, rb);
  __m512 acc_a = _mm512_setzero_ps(), acc_b = _mm512_setzero_ps();
  const int64_t full = k / 16 * 16;
  for (int64_t c = 0; c < full; c += 16) {
    // 16 values: half a line of bf16, a quarter of fp8 (the repeats cost nothing).
    _mm_prefetch(reinterpret_cast<const char*>(a.row + c * kBytes) + kRowPrefetchBytes,
                 _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(b.row + c * kBytes) + kRowPrefetchBytes,
                 _MM_HINT_T0);
    const __m512 xv = _mm512_loadu_ps(x + c);
    acc_a = _mm512_fmadd_ps(a.Load(c, static_cast<__mmask16>(0xffff)), xv, acc_a);
    acc_b = _mm512_fmadd_ps(b.Load(c, static_cast<__mmask16>(0xffff)), xv, acc_b);
  }
  if (full < k) {
    const __mmask16 m = TailMask(k - full);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + full);
    acc_a = _mm512_fmadd_ps(a.Load(full, m), xv, acc_a);
    acc_b = _mm512_fmadd_ps(b.Load(full, m), xv, acc_b);
  }
  *ya = a.Finish(_mm512_reduce_add_ps(acc_a));
  *yb = b.Finish(_mm512_reduce_add_ps(acc_b));
}

// The transposed product of a 64-column slice: y[i, c] = sum_j x[i, j] * w[r0 + j, c0 + c] for
// j < nrows, c < ncols (<= 64), i < MB. Each weight row's slice is widened once into four
// registers and used MB times.
template <WeightDType D, int MB>
SPLITMOE_AVX512 void StreamTileT(const float* x, int64_t ldx, const Matrix& w, int64_t r0,
                                 int64_t nrows, int64_t c0, int64_t ncols, float* y, int64_t ldy) {
  const int64_t row_bytes = w.cols * model::WeightDTypeBytes(D);
  __mmask16 mask[4];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) mask[q] = ncols > 16 * q ? TailMask(ncols - 16 * q) : 0;
  __m512 acc[MB][4];
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_setzero_ps();
  for (int64_t j = 0; j < nrows; ++j) {
    const uint8_t* row = w.raw + (r0 + j) * row_bytes;
    const float* srow = D == WeightDType::kFp8E4M3 ? ScaleRow(w, r0 + j) : nullptr;
    __m512 wv[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) wv[q] = LoadW<D>(row, srow, c0 + 16 * q, mask[q]);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const __m512 xb = _mm512_set1_ps(x[i * ldx + j]);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[i][q] = _mm512_fmadd_ps(wv[q], xb, acc[i][q]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i)
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) _mm512_mask_storeu_ps(y + i * ldy + 16 * q, mask[q], acc[i][q]);
}

template <WeightDType D>
SPLITMOE_AVX512 void StreamColsT(const float* x, int64_t ldx, int64_t m, const Matrix& w,
                                 int64_t r0, int64_t nrows, int64_t c0, int64_t ncols, float* y,
                                 int64_t ldy) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4)
    StreamTileT<D, 4>(x + i * ldx, ldx, w, r0, nrows, c0, ncols, y + i * ldy, ldy);
  switch (m - i) {
    case 3:
      StreamTileT<D, 3>(x + i * ldx, ldx, w, r0, nrows, c0, ncols, y + i * ldy, ldy);
      break;
    case 2:
      StreamTileT<D, 2>(x + i * ldx, ldx, w, r0, nrows, c0, ncols, y + i * ldy, ldy);
      break;
    case 1:
      StreamTileT<D, 1>(x + i * ldx, ldx, w, r0, nrows, c0, ncols, y + i * ldy, ldy);
      break;
    default:
      break;
  }
}

// Weight rows per tile, against up to 4 rows of x: BF16 6 (24 accumulators; at M = 4-48
// 5-10% more GFLOP/s than 4 rows, and more than 8 x 3), FP8 4 (its widening needs more
// registers). M = 1 reads two rows far apart at a time (StreamRowPair).
template <WeightDType D>
constexpr int kTileRows = D == WeightDType::kBFloat16 ? 6 : 4;
// What the threads' runs of rows are multiples of: every dtype's tile.
constexpr int64_t kStreamRows = 12;

// Weight rows [r0, r1) against every row of x (one thread): y[i, j] = x[i, :] . w[r0 + j, :].
template <WeightDType D>
SPLITMOE_AVX512 void StreamRange(const float* x, int64_t ldx, int64_t m, const Matrix& w,
                                 int64_t r0, int64_t r1, float* y, int64_t ldy) {
  if (m == 1) {  // two streams: the run's halves side by side
    const int64_t half = (r1 - r0) / 2;
    for (int64_t r = r0; r < r0 + half; ++r)
      StreamRowPair<D>(x, w, r, r + half, y + (r - r0), y + (r + half - r0));
    if ((r1 - r0) % 2 != 0) StreamRows<D, 1>(x, ldx, 1, w, r1 - 1, y + (r1 - 1 - r0), ldy);
    return;
  }
  constexpr int R = kTileRows<D>;
  int64_t r = r0;
  for (; r + R <= r1; r += R) StreamRows<D, R>(x, ldx, m, w, r, y + (r - r0), ldy);
  for (; r < r1; ++r) StreamRows<D, 1>(x, ldx, m, w, r, y + (r - r0), ldy);
}

template <WeightDType D>
SPLITMOE_AVX512 void StreamLinearAvx512(const float* x, int64_t m, const Matrix& w, float* y) {
  const int64_t n = w.rows;
  // Below ~64 KiB of weights the threads' start-up costs more than the stream.
  if (n * w.cols < (1 << 16)) {
    StreamRange<D>(x, w.cols, m, w, 0, n, y, n);
    return;
  }
  // Contiguous, tile-aligned runs of the weight's rows (the prefetchers follow a run;
  // interleaved tiles read 0.8 of this bandwidth), about eight per thread of at least 64 KiB,
  // taken in turn: a thread slowed by another process's work on its core takes fewer, where a
  // fixed half each left the other thread waiting at the end.
  const int64_t row_bytes = w.cols * model::WeightDTypeBytes(D);
  const int64_t threads = CpuThreads();
  int64_t step = std::max<int64_t>(64 << 10, n * row_bytes / (8 * threads)) / row_bytes;
  step = std::max<int64_t>(kStreamRows, step / kStreamRows * kStreamRows);
  const int64_t runs = (n + step - 1) / step;
#pragma omp parallel for schedule(dynamic, 1) if (runs > 1 && !CpuInParallel())
  for (int64_t i = 0; i < runs; ++i) {
    const int64_t r0 = i * step, r1 = std::min(n, r0 + step);
    StreamRange<D>(x, w.cols, m, w, r0, r1, y + r0, n);
  }
}

bool DetectAvx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

}  // namespace

bool NarrowKernelsUseAvx512();

namespace {

void WidenRow(const Matrix& w, int64_t r, float* out) {
  if (NarrowKernelsUseAvx512()) {
    if (w.dtype == WeightDType::kBFloat16) {
      WidenRowAvx512<WeightDType::kBFloat16>(w, r, out);
    } else {
      WidenRowAvx512<WeightDType::kFp8E4M3>(w, r, out);
    }
  } else {
    WidenRowPortable(w, r, out);
  }
}

// A thread's scratch for widened weights; grows, never shrinks (fresh pages fault slowly).
std::vector<float>& Scratch() {
  thread_local std::vector<float> scratch;
  return scratch;
}

void StreamLinearPortable(const float* x, int64_t m, const Matrix& w, float* y) {
  const int64_t n = w.rows, k = w.cols;
#pragma omp parallel for schedule(static) if (n * k >= (1 << 16) && !CpuInParallel())
  for (int64_t r = 0; r < n; ++r) {
    std::vector<float>& row = Scratch();
    if (static_cast<int64_t>(row.size()) < k) row.resize(static_cast<size_t>(k));
    WidenRowPortable(w, r, row.data());
    for (int64_t i = 0; i < m; ++i) {
      const float* xi = x + i * k;
      float sum = 0.0f;
      for (int64_t c = 0; c < k; ++c) sum += xi[c] * row[c];
      y[i * n + r] = sum;
    }
  }
}

// Each thread widens panels of weight rows once and multiplies all of x against them.
void PanelLinear(const float* x, int64_t m, const Matrix& w, float* y) {
  const int64_t n = w.rows, k = w.cols;
  const int64_t threads = CpuThreads();
  // Panels of up to 256 rows, at least two per thread when the weight allows.
  int64_t rows_per_panel = std::min<int64_t>(256, (n + 2 * threads - 1) / (2 * threads));
  rows_per_panel = std::max<int64_t>(16, (rows_per_panel + 15) / 16 * 16);
  const int64_t panels = (n + rows_per_panel - 1) / rows_per_panel;
#pragma omp parallel for schedule(dynamic, 1) if (!CpuInParallel())
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t r0 = p * rows_per_panel;
    const int64_t nr = std::min(rows_per_panel, n - r0);
    std::vector<float>& panel = Scratch();
    if (static_cast<int64_t>(panel.size()) < nr * k) panel.resize(static_cast<size_t>(nr * k));
    WidenRows(w, r0, nr, panel.data());
    // Inside the parallel region oneDNN runs the sgemm on this thread alone.
    SgemmOnThisThread(false, true, m, nr, k, 1.0f, x, k, panel.data(), k, 0.0f, y + r0, n);
  }
}

}  // namespace

std::atomic<bool>& UseAvx512() {
  static std::atomic<bool> use(DetectAvx512());
  return use;
}

bool NarrowKernelsUseAvx512() { return UseAvx512().load(std::memory_order_relaxed); }

void SetNarrowKernelsAvx512ForTest(bool use) { UseAvx512().store(use && DetectAvx512()); }

const float* WidenedRows(const model::Matrix& w, int64_t row0, int64_t nrows) {
  if (!w.narrow()) return w.data.data() + row0 * w.cols;
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < nrows * w.cols) {
    buffer.resize(static_cast<size_t>(nrows * w.cols));
  }
  WidenRows(w, row0, nrows, buffer.data());
  return buffer.data();
}

void WidenRows(const Matrix& w, int64_t row0, int64_t nrows, float* out) {
  if (!w.narrow()) {
    std::memcpy(out, w.data.data() + row0 * w.cols,
                static_cast<size_t>(nrows * w.cols) * sizeof(float));
    return;
  }
  for (int64_t r = 0; r < nrows; ++r) WidenRow(w, row0 + r, out + r * w.cols);
}

void NarrowLinear(const float* x, int64_t m, const Matrix& w, float* y) {
  if (m <= 0 || w.rows == 0) return;
  // BF16 streams further than FP8: its widening is two instructions per 16 values, so
  // re-reading the weight from cache for every 4 rows of x beats a widened panel up to ~128
  // rows (BM_NarrowGemm at M = 48: 293 against 176 GFLOP/s); FP8's widening does not pay that.
  const int64_t stream_max = w.dtype == WeightDType::kBFloat16 && NarrowKernelsUseAvx512()
                                 ? kBf16StreamMaxRows
                                 : kNarrowStreamMaxRows;
  if (m > stream_max) {
    PanelLinear(x, m, w, y);
  } else if (!NarrowKernelsUseAvx512()) {
    StreamLinearPortable(x, m, w, y);
  } else if (w.dtype == WeightDType::kBFloat16) {
    StreamLinearAvx512<WeightDType::kBFloat16>(x, m, w, y);
  } else {
    StreamLinearAvx512<WeightDType::kFp8E4M3>(x, m, w, y);
  }
}

namespace {

// A slice of one task that one thread runs: weight rows [r0, r1) (normal form) or columns
// [c0, c1) over all the task's rows (transposed form).
struct Unit {
  const LinearTask* task;
  int64_t begin, end;
};

void RunUnitPortable(const Unit& u) {
  const LinearTask& t = *u.task;
  const Matrix& w = *t.w;
  std::vector<float>& row = Scratch();
  if (static_cast<int64_t>(row.size()) < w.cols) row.resize(static_cast<size_t>(w.cols));
  if (!t.transposed) {
    for (int64_t r = u.begin; r < u.end; ++r) {
      WidenRowPortable(w, t.row0 + r, row.data());
      for (int64_t i = 0; i < t.m; ++i) {
        const float* xi = t.x + i * t.ldx;
        float sum = 0.0f;
        for (int64_t c = 0; c < w.cols; ++c) sum += xi[c] * row[c];
        t.y[i * t.ldy + r] = sum;
      }
    }
    return;
  }
  for (int64_t i = 0; i < t.m; ++i) std::fill(t.y + i * t.ldy + u.begin, t.y + i * t.ldy + u.end, 0.0f);
  for (int64_t r = 0; r < t.rows; ++r) {
    WidenRowPortable(w, t.row0 + r, row.data());
    for (int64_t i = 0; i < t.m; ++i) {
      const float xr = t.x[i * t.ldx + r];
      float* yi = t.y + i * t.ldy;
      for (int64_t c = u.begin; c < u.end; ++c) yi[c] += xr * row[c];
    }
  }
}

template <WeightDType D>
SPLITMOE_AVX512 void RunUnitAvx512(const Unit& u) {
  const LinearTask& t = *u.task;
  if (!t.transposed) {
    StreamRange<D>(t.x, t.ldx, t.m, *t.w, t.row0 + u.begin, t.row0 + u.end, t.y + u.begin, t.ldy);
    return;
  }
  for (int64_t c = u.begin; c < u.end; c += 64) {
    StreamColsT<D>(t.x, t.ldx, t.m, *t.w, t.row0, t.rows, c, std::min<int64_t>(64, u.end - c),
                   t.y + c, t.ldy);
  }
}

void RunUnit(const Unit& u) {
  if (!NarrowKernelsUseAvx512()) {
    RunUnitPortable(u);
  } else if (u.task->w->dtype == WeightDType::kBFloat16) {
    RunUnitAvx512<WeightDType::kBFloat16>(u);
  } else {
    RunUnitAvx512<WeightDType::kFp8E4M3>(u);
  }
}

}  // namespace

bool GroupedLinearSupports(const LinearTask& t) {
  if (t.w == nullptr || !t.w->narrow() || t.x == nullptr || t.y == nullptr) return false;
  if (t.m < 0 || t.m > kNarrowStreamMaxRows || t.rows < 0 || t.row0 < 0 ||
      t.row0 + t.rows > t.w->rows) {
    return false;
  }
  const int64_t in = t.transposed ? t.rows : t.w->cols;
  const int64_t out = t.transposed ? t.w->cols : t.rows;
  return t.m <= 1 || (t.ldx >= in && t.ldy >= out);
}

absl::Status CheckGroupedLinear(absl::Span<const LinearTask> tasks) {
  for (size_t i = 0; i < tasks.size(); ++i) {
    const LinearTask& t = tasks[i];
    if (!GroupedLinearSupports(t)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "grouped linear task ", i, ": ", t.m, " rows against weight rows [", t.row0, ", ",
          t.row0 + t.rows, ") of a ", t.w ? t.w->rows : 0, " x ", t.w ? t.w->cols : 0, " ",
          t.w && t.w->narrow() ? "narrow" : "fp32 or missing", " weight (ldx ", t.ldx, ", ldy ",
          t.ldy, "); supported: BF16/FP8 weights, at most ", kNarrowStreamMaxRows,
          " rows, rows and strides in range"));
    }
  }
  return absl::OkStatus();
}

absl::Status GroupedLinear(absl::Span<const LinearTask> tasks) {
  SPLITMOE_RETURN_IF_ERROR(CheckGroupedLinear(tasks));
  // Units of about an equal share of the weight bytes: ~8 per thread, at least 64 KiB each.
  int64_t total = 0;
  for (const LinearTask& t : tasks) total += t.rows * t.w->cols * model::WeightDTypeBytes(t.w->dtype);
  const int64_t threads = CpuThreads();
  const int64_t target = std::max<int64_t>(64 << 10, total / (8 * threads));
  std::vector<Unit> units;
  for (const LinearTask& t : tasks) {
    if (t.m == 0) continue;
    if (t.rows == 0) {  // an empty sum: the transposed form's outputs are zeros
      if (t.transposed) {
        for (int64_t i = 0; i < t.m; ++i) std::fill(t.y + i * t.ldy, t.y + i * t.ldy + t.w->cols, 0.0f);
      }
      continue;
    }
    const int64_t row_bytes = t.w->cols * model::WeightDTypeBytes(t.w->dtype);
    if (!t.transposed) {
      const int64_t step =
          std::max<int64_t>(kStreamRows, target / row_bytes / kStreamRows * kStreamRows);
      for (int64_t r = 0; r < t.rows; r += step) units.push_back({&t, r, std::min(t.rows, r + step)});
    } else if (!NarrowKernelsUseAvx512()) {
      units.push_back({&t, 0, t.w->cols});
    } else {
      const int64_t col_bytes = t.rows * model::WeightDTypeBytes(t.w->dtype);
      const int64_t step = std::max<int64_t>(64, target / std::max<int64_t>(1, col_bytes) / 64 * 64);
      for (int64_t c = 0; c < t.w->cols; c += step)
        units.push_back({&t, c, std::min(t.w->cols, c + step)});
    }
  }
  const auto n = static_cast<int64_t>(units.size());
#pragma omp parallel for schedule(dynamic, 1) if (total >= (1 << 16) && n > 1 && !CpuInParallel())
  for (int64_t i = 0; i < n; ++i) RunUnit(units[static_cast<size_t>(i)]);
  return absl::OkStatus();
}

}  // namespace splitmoe::kernels
