// Weight-only int8 matrix product for XLA:CPU, as an XLA FFI custom call.
//
//   y[r, o] = sum_g scale[g, o] * sum_{i in group g} x[r, i] * q[i, o]
//
// x float32 [m, in], q int8 [in, out] (row-major), scale float32 [groups, out], y float32
// [m, out]; a group is in / groups consecutive rows of q. The int8 weight is read once per
// call and converted in registers, so a product reads 1 byte per weight (plus one scale per
// group) instead of the 4 of a float32 weight: what makes int8 faster than float32 when decoding
// (m is the batch, or a short chunk of a prompt). XLA's own CPU path writes the float weight
// out first.
//
// Work split: the output columns are cut into blocks of kTile, in as many shares as XLA's
// intra-op pool has threads, claimed by the caller's thread and the pool's (see
// Int8MatmulImpl). Each block keeps kTile x kRows accumulators for one group in registers, adds
// the group's 16 (or in) rows of q into them, then adds scale * acc to the output. The sums
// run in float32 in the order i = 0, 1, ... inside a group and g = 0, 1, ... across groups.
// The last block of a width that is not a multiple of kTile runs in scalar code.
//
// Built by rwkv_jax_kernels/int8_cpu.py with the host compiler (g++ -O3 -march=native). The
// vectors are GCC/Clang vector types, which the compiler lowers to the target's SIMD registers;
// only the int8 -> float conversion has x86 intrinsics (AVX2 / AVX-512), with a generic
// fallback.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Floats per vector: one register of the target's widest float SIMD that the compiler enables.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
constexpr int64_t kTile = 64;                 // output columns per block
constexpr int64_t kVecs = kTile / kLanes;     // vectors per block row
constexpr int64_t kRows = 4;                  // rows of x per pass over a block of q
constexpr int64_t kPrefetch = 4 * kTile;      // bytes ahead along a row of q to prefetch

// GCC/Clang vector types: the compiler maps them onto whatever SIMD the target has.
typedef float VecF __attribute__((vector_size(kLanes * sizeof(float))));

// kLanes int8 weights as floats: sign-extended to int32, then converted (x86 intrinsics where
// the target has them; GCC 12 turns the generic form into one conversion per element).
inline VecF LoadQ(const int8_t* p) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtepi32_ps(
      _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  VecF v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#elif defined(__AVX2__)
  const __m256 f = _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  VecF v;
  std::memcpy(&v, &f, sizeof(v));
  return v;
#else
  VecF v;
  for (int64_t j = 0; j < kLanes; ++j) v[j] = static_cast<float>(p[j]);
  return v;
#endif
}

inline VecF LoadF(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Adds group g's share to output columns [c0, c0 + kTile) of rows [r0, r0 + R) of y.
template <int R>
void FullBlock(const float* x, const int8_t* q, const float* scale, float* y, int64_t d_in,
               int64_t d_out, int64_t per_group, int64_t g, int64_t r0, int64_t c0) {
  VecF acc[R][kVecs] = {};
  for (int64_t i = g * per_group; i < (g + 1) * per_group; ++i) {
    const int8_t* q_row = q + i * d_out + c0;
    // Each row of the group is its own stream through q; one core's hardware prefetchers do not
    // keep that many streams ahead (measured: 13 GB/s without this line, 18 with it).
    __builtin_prefetch(q_row + kPrefetch);
    VecF w[kVecs];
    for (int v = 0; v < kVecs; ++v) w[v] = LoadQ(q_row + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const float xi = x[(r0 + r) * d_in + i];
      for (int v = 0; v < kVecs; ++v) acc[r][v] += xi * w[v];
    }
  }
  const float* s_row = scale + g * d_out + c0;
  for (int v = 0; v < kVecs; ++v) {
    const VecF s = LoadF(s_row + v * kLanes);
    for (int r = 0; r < R; ++r) {
      float* y_v = y + (r0 + r) * d_out + c0 + v * kLanes;
      const VecF sum = LoadF(y_v) + s * acc[r][v];
      std::memcpy(y_v, &sum, sizeof(sum));
    }
  }
}

// Adds group g's share to columns [c0, d_out) of row r of y, in scalar code (the last block of
// a width that is not a multiple of kTile).
void PartialBlock(const float* x, const int8_t* q, const float* scale, float* y, int64_t d_in,
                  int64_t d_out, int64_t per_group, int64_t g, int64_t r, int64_t c0) {
  for (int64_t c = c0; c < d_out; ++c) {
    float acc = 0.0f;
    for (int64_t i = g * per_group; i < (g + 1) * per_group; ++i) {
      acc += x[r * d_in + i] * static_cast<float>(q[i * d_out + c]);
    }
    y[r * d_out + c] += scale[g * d_out + c] * acc;
  }
}

// Every row of y for the columns of blocks [b0, b1): group by group, so that q is read row
// after row (per_group sequential streams), not down its columns.
void Columns(const float* x, const int8_t* q, const float* scale, float* y, int64_t m,
             int64_t d_in, int64_t d_out, int64_t groups, int64_t b0, int64_t b1) {
  const int64_t c_begin = b0 * kTile, c_end = std::min(b1 * kTile, d_out);
  for (int64_t r = 0; r < m; ++r) {
    std::fill(y + r * d_out + c_begin, y + r * d_out + c_end, 0.0f);
  }
  const int64_t per_group = d_in / groups;
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kTile;
      if (c0 + kTile > d_out) {
        for (int64_t r = 0; r < m; ++r) {
          PartialBlock(x, q, scale, y, d_in, d_out, per_group, g, r, c0);
        }
        continue;
      }
      int64_t r = 0;
      for (; r + kRows <= m; r += kRows) {
        FullBlock<kRows>(x, q, scale, y, d_in, d_out, per_group, g, r, c0);
      }
      switch (m - r) {
        case 3: FullBlock<3>(x, q, scale, y, d_in, d_out, per_group, g, r, c0); break;
        case 2: FullBlock<2>(x, q, scale, y, d_in, d_out, per_group, g, r, c0); break;
        case 1: FullBlock<1>(x, q, scale, y, d_in, d_out, per_group, g, r, c0); break;
        default: break;
      }
    }
  }
}

ffi::Error Int8MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::Buffer<ffi::S8> q, ffi::Buffer<ffi::F32> scale,
                          ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto q_dims = q.dimensions();
  const auto s_dims = scale.dimensions();
  if (x_dims.size() != 2 || q_dims.size() != 2 || s_dims.size() != 2) {
    return ffi::Error::InvalidArgument("int8_matmul: x, q and scale must be 2-d");
  }
  const int64_t m = x_dims[0], d_in = x_dims[1], d_out = q_dims[1], groups = s_dims[0];
  if (q_dims[0] != d_in || s_dims[1] != d_out || groups < 1 || d_in % groups != 0) {
    return ffi::Error::InvalidArgument(
        "int8_matmul: expected x [m, in], q [in, out], scale [groups, out], groups dividing in");
  }
  const float* xp = x.typed_data();
  const int8_t* qp = q.typed_data();
  const float* sp = scale.typed_data();
  float* yp = y->typed_data();
  const int64_t blocks = (d_out + kTile - 1) / kTile;
  // At least 2 column blocks per task: smaller shares cost more to hand over than they save.
  const int64_t tasks = std::max<int64_t>(
      1, std::min<int64_t>(pool.num_threads(), blocks / 2));
  if (tasks == 1) {
    Columns(xp, qp, sp, yp, m, d_in, d_out, groups, 0, blocks);
    return ffi::Error::Success();
  }
  // The shares are claimed, not assigned: XLA may run several of these calls at once on its
  // pool, so a scheduled task may not start until this call returns. Whoever comes first (this
  // thread included) takes the next share; this thread then waits only for shares already being
  // worked on, which finish. A task that starts late finds none left and touches nothing but the
  // counters it co-owns.
  struct Counters {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto counters = std::make_shared<Counters>();
  const auto work = [counters, tasks, blocks, xp, qp, sp, yp, m, d_in, d_out, groups] {
    for (int64_t k = counters->next.fetch_add(1); k < tasks;
         k = counters->next.fetch_add(1)) {
      Columns(xp, qp, sp, yp, m, d_in, d_out, groups, blocks * k / tasks,
              blocks * (k + 1) / tasks);
      counters->finished.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t k = 1; k < tasks; ++k) {
    auto task = work;  // Schedule takes its own copy (it holds one reference to the counters)
    pool.Schedule(std::move(task));
  }
  work();
  while (counters->finished.load(std::memory_order_acquire) < tasks) {
    std::this_thread::yield();
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RwkvInt8Matmul, Int8MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
