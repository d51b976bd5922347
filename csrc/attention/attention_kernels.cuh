// Flash-style attention kernels for selfboottok::attention_{fwd,bwd}_kernel (contract:
// selfboottok/ops/attention.py). One block of 4 warps per 64-row tile (queries for the forward
// and dQ, keys for dK/dV); each warp owns 16 rows of every tile, so after the block-wide tile
// loads a warp only synchronises with itself. Keys are read in place from up to 4 chunks.
//
// Matrix products go through WarpTile: WMMA 16x16x16 (fp32 accumulate) for half/bfloat16, plain
// fp32 FMAs for float (TF32 would not meet the error budget). Fragments are opaque, so score
// tiles and the forward's O accumulator live in shared memory between products.
//
// This header also compiles as host C++ under tests/cuda_emu/cuda_emu.h (SBT_CUDA_EMULATION),
// which runs the same kernels on the CPU for the tests.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include <torch/types.h>

#include "arg_checks.h"

#ifndef SBT_CUDA_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define SBT_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#else
#define SBT_DYNAMIC_SMEM(name) unsigned char* name = ::sbt_emu::dynamic_smem()
#endif

namespace sbt {
namespace attention {

constexpr int kMaxChunks = kMaxAttentionChunks;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 16 * kWarps;  // rows of the block's own tile
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything a launch needs; strides in elements. Chunk c holds global keys [off[c], off[c] + len[c]).
template <typename T>
struct Params {
  const T* q;
  int64_t q_sb, q_sh, q_sl;
  const T* dout;
  int64_t do_sb, do_sh, do_sl;
  const T* k[kMaxChunks];
  int64_t k_sb[kMaxChunks], k_sh[kMaxChunks], k_sl[kMaxChunks];
  const T* v[kMaxChunks];
  int64_t v_sb[kMaxChunks], v_sh[kMaxChunks], v_sl[kMaxChunks];
  int len[kMaxChunks], off[kMaxChunks];
  int tile0[kMaxChunks + 1];  // first dK/dV block of each chunk (kRows keys per block)
  int n_chunks;
  const bool* mask;  // [B, Lk] or null
  T* out;
  float* lse;  // written by the forward, read by the backward
  const float* delta;
  T* dq;
  T* dk[kMaxChunks];
  T* dv[kMaxChunks];
  int H, Lq, Lk, D, d16;  // d16: D rounded up to 16 (the padding columns are zero in smem)
  int n_tiles;            // blocks per (batch, head)
  bool causal;
  float scale, scale_log2;
};

template <typename T>
struct Conv;
template <>
struct Conv<float> {
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <>
struct Conv<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <>
struct Conv<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// Tile shapes. kBN: keys per step of the forward and dQ loops, queries per step of the dK/dV
// loop. Row pads keep 16-byte row alignment (vector loads, WMMA's 256-bit pointers) and stagger
// shared-memory banks.
template <typename T, int DMAX>
struct Cfg {
  static constexpr bool kF32 = std::is_same<T, float>::value;
  static constexpr int kPad = kF32 ? 4 : 8;
  static constexpr int kBN = kF32 ? 32 : 64;
  static constexpr int kLdT = DMAX + kPad;  // Q, K, V, dO tiles (T)
  static constexpr int kLdS = kBN + 4;      // score tiles (fp32)
  static constexpr int kLdP = kBN + kPad;   // probability / dS tiles (T)
  static constexpr int kLdO = DMAX + 4;     // forward O accumulator (fp32)
  static_assert(DMAX % 16 == 0 && DMAX <= 128, "head-dim bucket");
};

constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// Byte offsets of a kernel's shared-memory regions of the given sizes, laid out in order, each
// 128-byte aligned; at[N] is the total.
template <int N>
struct SmemPlan {
  size_t at[N + 1];
  constexpr explicit SmemPlan(const size_t (&bytes)[N]) : at{} {
    for (int i = 0; i < N; ++i) at[i + 1] = align128(at[i] + bytes[i]);
  }
};

// Bytes per row of each kind of tile.
template <typename T, int DMAX>
struct RowBytes {
  using C = Cfg<T, DMAX>;
  static constexpr size_t op = sizeof(T) * C::kLdT, s = sizeof(float) * C::kLdS;
  static constexpr size_t p = sizeof(T) * C::kLdP, o = sizeof(float) * C::kLdO;
};

template <typename T, int DMAX>
struct FwdSmem {
  using C = Cfg<T, DMAX>;
  using R = RowBytes<T, DMAX>;
  static constexpr SmemPlan<8> plan{{kRows * R::op, C::kBN * R::op, C::kBN * R::op, kRows * R::s,
                                     kRows * R::p, kRows * R::o, kRows * sizeof(float), C::kBN}};
  static constexpr size_t q = plan.at[0], k = plan.at[1], v = plan.at[2], s = plan.at[3];
  static constexpr size_t p = plan.at[4], o = plan.at[5], inv = plan.at[6], ok = plan.at[7];
  static constexpr size_t bytes = plan.at[8];
};

template <typename T, int DMAX>
struct DqSmem {
  using C = Cfg<T, DMAX>;
  using R = RowBytes<T, DMAX>;
  static constexpr SmemPlan<10> plan{{kRows * R::op, kRows * R::op, C::kBN * R::op, C::kBN * R::op,
                                      kRows * R::s, kRows * R::s, kRows * R::p,
                                      kRows * sizeof(float), kRows * sizeof(float), C::kBN}};
  static constexpr size_t q = plan.at[0], dout = plan.at[1], k = plan.at[2], v = plan.at[3];
  static constexpr size_t s = plan.at[4], dp = plan.at[5], ds = plan.at[6], lse = plan.at[7];
  static constexpr size_t delta = plan.at[8], ok = plan.at[9], bytes = plan.at[10];
};

template <typename T, int DMAX>
struct DkvSmem {
  using C = Cfg<T, DMAX>;
  using R = RowBytes<T, DMAX>;
  static constexpr SmemPlan<11> plan{{kRows * R::op, kRows * R::op, C::kBN * R::op, C::kBN * R::op,
                                      kRows * R::s, kRows * R::s, kRows * R::p, kRows * R::p,
                                      C::kBN * sizeof(float), C::kBN * sizeof(float), kRows}};
  static constexpr size_t k = plan.at[0], v = plan.at[1], q = plan.at[2], dout = plan.at[3];
  static constexpr size_t s = plan.at[4], dp = plan.at[5], p = plan.at[6], ds = plan.at[7];
  static constexpr size_t lse = plan.at[8], delta = plan.at[9], ok = plan.at[10];
  static constexpr size_t bytes = plan.at[11];
};

// A warp's 16 x (16 * NF) fp32 accumulator tile. Collective: every lane of the warp calls every
// member with the same arguments. mma: tile(:, 16j:16j+16) += A[16 x kdim] B[kdim x 16j:16j+16]
// for j < nf, A row-major; B row-major, or with kBColMajor B(kk, n) = b[n * ldb + kk].
template <typename T, int NF, bool kScalar = std::is_same<T, float>::value>
struct WarpTile;

template <typename T, int NF>
struct WarpTile<T, NF, false> {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> f[NF];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < NF; ++j) nvcuda::wmma::fill_fragment(f[j], 0.f);
  }

  template <bool kBColMajor>
  __device__ __forceinline__ void mma(const T* a, int lda, const T* b, int ldb, int kdim, int nf) {
    namespace wmma = nvcuda::wmma;
    using BLayout = typename std::conditional<kBColMajor, wmma::col_major, wmma::row_major>::type;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb;
    for (int kk = 0; kk < kdim; kk += 16) {
      wmma::load_matrix_sync(fa, a + kk, lda);
#pragma unroll
      for (int j = 0; j < NF; ++j) {
        if (j < nf) {
          wmma::load_matrix_sync(fb, kBColMajor ? b + 16 * j * ldb + kk : b + kk * ldb + 16 * j,
                                 ldb);
          wmma::mma_sync(f[j], fa, fb, f[j]);
        }
      }
    }
  }

  __device__ __forceinline__ void load(const float* src, int ld, int nf) {
#pragma unroll
    for (int j = 0; j < NF; ++j)
      if (j < nf) nvcuda::wmma::load_matrix_sync(f[j], src + 16 * j, ld, nvcuda::wmma::mem_row_major);
  }

  __device__ __forceinline__ void store_frag(int j, float* dst, int ld) const {
    nvcuda::wmma::store_matrix_sync(dst, f[j], ld, nvcuda::wmma::mem_row_major);
  }
};

// fp32: lane l owns rows 4*(l/8)..+3 and, in each 16-column block, columns l%8 and l%8+8.
template <typename T, int NF>
struct WarpTile<T, NF, true> {
  float c[NF][4][2];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int j = 0; j < NF; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) c[j][r][0] = c[j][r][1] = 0.f;
  }

  template <bool kBColMajor>
  __device__ __forceinline__ void mma(const T* a, int lda, const T* b, int ldb, int kdim, int nf) {
    const int lane = threadIdx.x & 31, r0 = (lane >> 3) * 4, cg = lane & 7;
    for (int kk = 0; kk < kdim; ++kk) {
      float av[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) av[r] = a[(r0 + r) * lda + kk];
#pragma unroll
      for (int j = 0; j < NF; ++j) {
        if (j < nf) {
          const int n0 = 16 * j + cg;
          const float b0 = kBColMajor ? b[n0 * ldb + kk] : b[kk * ldb + n0];
          const float b1 = kBColMajor ? b[(n0 + 8) * ldb + kk] : b[kk * ldb + n0 + 8];
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            c[j][r][0] = fmaf(av[r], b0, c[j][r][0]);
            c[j][r][1] = fmaf(av[r], b1, c[j][r][1]);
          }
        }
      }
    }
  }

  __device__ __forceinline__ void load(const float* src, int ld, int nf) {
    const int lane = threadIdx.x & 31, r0 = (lane >> 3) * 4, cg = lane & 7;
#pragma unroll
    for (int j = 0; j < NF; ++j) {
      if (j < nf) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          c[j][r][0] = src[(r0 + r) * ld + 16 * j + cg];
          c[j][r][1] = src[(r0 + r) * ld + 16 * j + cg + 8];
        }
      }
    }
  }

  __device__ __forceinline__ void store_frag(int j, float* dst, int ld) const {
    const int lane = threadIdx.x & 31, r0 = (lane >> 3) * 4, cg = lane & 7;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      dst[(r0 + r) * ld + cg] = c[j][r][0];
      dst[(r0 + r) * ld + cg + 8] = c[j][r][1];
    }
  }
};

template <typename T, int NF, bool S>
__device__ __forceinline__ void store_tile(const WarpTile<T, NF, S>& t, float* dst, int ld, int nf) {
#pragma unroll
  for (int j = 0; j < NF; ++j)
    if (j < nf) t.store_frag(j, dst + 16 * j, ld);
}

// Writes rows [0, rows) and columns [0, d) of mul * tile to dst (row stride ld), through a
// 16 x 16 fp32 staging area of the warp.
template <typename T, int NF, bool S>
__device__ __forceinline__ void write_rows(const WarpTile<T, NF, S>& t, T* dst, int64_t ld,
                                           int rows, int d, float mul, float* stage, int ld_stage) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < NF; ++j) {
    if (16 * j < d) {
      t.store_frag(j, stage, ld_stage);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int r = e >> 4, col = 16 * j + (e & 15);
        if (r < rows && col < d) dst[r * ld + col] = Conv<T>::from(stage[r * ld_stage + (e & 15)] * mul);
      }
      __syncwarp();
    }
  }
}

// rows x d16 tile of src (row stride lds) into shared dst (row stride ldd); rows >= valid and
// columns >= d are zero. Block-collective.
template <typename T>
__device__ __forceinline__ void load_rows(T* dst, int ldd, const T* src, int64_t lds, int rows,
                                          int valid, int d, int d16) {
  constexpr int kVec = 8 * sizeof(T) / 16;  // 16-byte words per 8 elements
  const int groups = d16 >> 3;
  const bool vec =
      ((reinterpret_cast<uintptr_t>(src) | (static_cast<uintptr_t>(lds) * sizeof(T))) & 15) == 0;
  for (int e = threadIdx.x; e < rows * groups; e += kThreads) {
    const int r = e / groups, col = (e - r * groups) * 8;
    T* o = dst + r * ldd + col;
    uint4* o4 = reinterpret_cast<uint4*>(o);
    if (r < valid && col < d) {
      const T* s = src + r * lds + col;
      if (vec) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) o4[i] = reinterpret_cast<const uint4*>(s)[i];
      } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = s[i];
      }
    } else {
#pragma unroll
      for (int i = 0; i < kVec; ++i) o4[i] = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Key tile of chunk c starting at local key t0: K, V rows into smem and the per-key "real key"
// flags. Block-collective.
template <typename T, int kKeys, int kLd>
__device__ __forceinline__ void load_keys(const Params<T>& p, int c, int b, int h, int t0, T* sK,
                                          T* sV, unsigned char* ok) {
  const int valid = imin(kKeys, p.len[c] - t0);
  load_rows(sK, kLd, p.k[c] + b * p.k_sb[c] + h * p.k_sh[c] + t0 * p.k_sl[c], p.k_sl[c], kKeys,
            valid, p.D, p.d16);
  load_rows(sV, kLd, p.v[c] + b * p.v_sb[c] + h * p.v_sh[c] + t0 * p.v_sl[c], p.v_sl[c], kKeys,
            valid, p.D, p.d16);
  for (int j = threadIdx.x; j < kKeys; j += kThreads) {
    const int64_t key = static_cast<int64_t>(b) * p.Lk + p.off[c] + t0 + j;
    ok[j] = j < valid && (p.mask == nullptr || p.mask[key]);
  }
}

// Keys >= the result are masked for every query row in [q0, q0 + rows) (causal bound).
template <typename T>
__device__ __forceinline__ int key_end_for(const Params<T>& p, int q0, int rows) {
  return p.causal ? imin(p.Lk, q0 + rows + (p.Lk - p.Lq)) : p.Lk;
}

template <typename U>
__device__ __forceinline__ U* smem_at(unsigned char* smem, size_t offset) {
  return reinterpret_cast<U*>(smem + offset);
}

// Where a block stands: blockIdx.x = (batch * H + head) * n_tiles + tile.
struct BlockPos {
  int64_t bh;
  int tile, b, h, lane, warp;
};

template <typename T>
__device__ __forceinline__ BlockPos block_pos(const Params<T>& p) {
  const int64_t bid = blockIdx.x, bh = bid / p.n_tiles;
  const int tid = threadIdx.x;
  return {bh, static_cast<int>(bid % p.n_tiles), static_cast<int>(bh / p.H),
          static_cast<int>(bh % p.H), tid & 31, tid >> 5};
}

// Query rows [q0, q0 + rows) of (b, h) into smem, zero from `valid` on. Block-collective.
template <typename T, int kLd>
__device__ __forceinline__ void load_queries(const Params<T>& p, int b, int h, int q0, int rows,
                                             int valid, T* sQ) {
  load_rows(sQ, kLd, p.q + b * p.q_sb + h * p.q_sh + q0 * p.q_sl, p.q_sl, rows, valid, p.D, p.d16);
}

// What the backward kernels read per query row: Q, dO, the lse in log2 units (-inf past
// `valid`) and delta = rowsum(dO * O). Block-collective; the caller synchronises.
template <typename T, int kLd>
__device__ __forceinline__ void load_backward_rows(const Params<T>& p, const BlockPos& at, int q0,
                                                   int rows, int valid, T* sQ, T* sdO, float* sL2,
                                                   float* sDelta) {
  load_queries<T, kLd>(p, at.b, at.h, q0, rows, valid, sQ);
  load_rows(sdO, kLd, p.dout + at.b * p.do_sb + at.h * p.do_sh + q0 * p.do_sl, p.do_sl, rows,
            valid, p.D, p.d16);
  for (int i = threadIdx.x; i < rows; i += kThreads) {
    const bool in = i < valid;
    sL2[i] = in ? p.lse[at.bh * p.Lq + q0 + i] * kLog2e : -INFINITY;
    sDelta[i] = in ? p.delta[at.bh * p.Lq + q0 + i] : 0.f;
  }
}

// The shared tiles of the backward kernels: Q, dO, K, V, the rows' lse (log2 units) and delta,
// the key flags, and this warp's scores, dP and dS.
template <typename T>
struct BwdTiles {
  T *q, *dout, *k, *v;
  float *l2, *delta;
  unsigned char* ok;
  float *s, *dp;
  T* ds;
};

template <typename T, typename C, typename L>
__device__ __forceinline__ BwdTiles<T> bwd_tiles(unsigned char* smem, int warp) {
  const int ws = warp * 16 * C::kLdS, wp = warp * 16 * C::kLdP;
  return {smem_at<T>(smem, L::q),         smem_at<T>(smem, L::dout),
          smem_at<T>(smem, L::k),         smem_at<T>(smem, L::v),
          smem_at<float>(smem, L::lse),   smem_at<float>(smem, L::delta),
          smem + L::ok,                   smem_at<float>(smem, L::s) + ws,
          smem_at<float>(smem, L::dp) + ws, smem_at<T>(smem, L::ds) + wp};
}

// body(kg0) for every key tile (kKeys keys from global key kg0, never across chunks) that a
// query row of [q0, q0 + rows) may see, with the tile's K, V and key flags in smem.
// Block-collective.
template <typename T, int kKeys, int kLd, typename Body>
__device__ __forceinline__ void for_each_key_tile(const Params<T>& p, const BlockPos& at, int q0,
                                                  int rows, T* sK, T* sV, unsigned char* ok,
                                                  Body&& body) {
  const int key_end = key_end_for(p, q0, rows);
  for (int c = 0; c < p.n_chunks; ++c) {
    for (int t0 = 0; t0 < p.len[c] && p.off[c] + t0 < key_end; t0 += kKeys) {
      __syncthreads();
      load_keys<T, kKeys, kLd>(p, c, at.b, at.h, t0, sK, sV, ok);
      __syncthreads();
      body(p.off[c] + t0);
    }
  }
}

// dst (fp32, row stride ldd) = A B^T for one warp's 16 rows of A and 16 * NF rows of B, over
// the first k16 columns of both.
template <typename T, int NF>
__device__ __forceinline__ void warp_scores(const T* a, int lda, const T* b, int ldb, int k16,
                                            float* dst, int ldd) {
  WarpTile<T, NF> acc;
  acc.zero();
  acc.template mma<true>(a, lda, b, ldb, k16, NF);
  store_tile(acc, dst, ldd, NF);
}

// The backward's scores S = A B^T into sm.s and dP = A' B'^T into sm.dp, for one warp (operand
// row stride C::kLdT, over the first k16 columns).
template <typename T, int NF, typename C>
__device__ __forceinline__ void scores_and_dp(const BwdTiles<T>& sm, const T* a, const T* b,
                                              const T* a2, const T* b2, int k16) {
  warp_scores<T, NF>(a, C::kLdT, b, C::kLdT, k16, sm.s, C::kLdS);
  warp_scores<T, NF>(a2, C::kLdT, b2, C::kLdT, k16, sm.dp, C::kLdS);
  __syncwarp();
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads) attention_fwd_kernel(const Params<T> p) {
  using C = Cfg<T, DMAX>;
  using L = FwdSmem<T, DMAX>;
  constexpr int BN = C::kBN;
  SBT_DYNAMIC_SMEM(smem);
  T *sQ = smem_at<T>(smem, L::q), *sK = smem_at<T>(smem, L::k), *sV = smem_at<T>(smem, L::v);
  float* sInv = smem_at<float>(smem, L::inv);
  unsigned char* sOk = smem + L::ok;

  const BlockPos at = block_pos(p);
  const int64_t bh = at.bh;
  const int lane = at.lane, warp = at.warp;
  const int q0 = at.tile * kRows, qvalid = imin(kRows, p.Lq - q0);
  float* sS = smem_at<float>(smem, L::s) + warp * 16 * C::kLdS;
  T* sP = smem_at<T>(smem, L::p) + warp * 16 * C::kLdP;
  float* sO = smem_at<float>(smem, L::o) + warp * 16 * C::kLdO;

  load_queries<T, C::kLdT>(p, at.b, at.h, q0, kRows, qvalid, sQ);
  for (int e = lane; e < 16 * C::kLdO; e += 32) sO[e] = 0.f;
  __syncthreads();

  // Two lanes per score row: lane parity picks the even or odd columns.
  const int r = lane >> 1, par = lane & 1;
  const int qi = q0 + warp * 16 + r;
  const int diag = p.Lk - p.Lq;
  const int nfo = p.d16 / 16;
  float m = -INFINITY, l = 0.f;  // running max (log2 units) and sum of the row

  for_each_key_tile<T, BN, C::kLdT>(p, at, q0, qvalid, sK, sV, sOk, [&](int kg0) {
    warp_scores<T, BN / 16>(sQ + warp * 16 * C::kLdT, C::kLdT, sK, C::kLdT, p.d16, sS, C::kLdS);
    __syncwarp();

    float* srow = sS + r * C::kLdS;
    float mt = -INFINITY;
    for (int j = par; j < BN; j += 2) {
      const bool ok = sOk[j] && (!p.causal || kg0 + j <= qi + diag);
      const float x = ok ? srow[j] * p.scale_log2 : -INFINITY;
      srow[j] = x;
      mt = fmaxf(mt, x);
    }
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
    const float mn = fmaxf(m, mt);
    const float base = mn == -INFINITY ? 0.f : mn;  // no allowed key yet: every p is 0
    const float alpha = exp2f(m - base);
    float sum = 0.f;
    T* prow = sP + r * C::kLdP;
    for (int j = par; j < BN; j += 2) {
      const float pj = exp2f(srow[j] - base);
      prow[j] = Conv<T>::from(pj);
      sum += pj;
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = mn;
    float* orow = sO + r * C::kLdO;
    for (int d = par; d < p.d16; d += 2) orow[d] *= alpha;
    __syncwarp();

    WarpTile<T, DMAX / 16> o;
    o.load(sO, C::kLdO, nfo);
    o.template mma<false>(sP, C::kLdP, sV, C::kLdT, BN, nfo);
    store_tile(o, sO, C::kLdO, nfo);
  });
  __syncwarp();

  const int row = warp * 16 + r;
  if (par == 0) {
    sInv[row] = l > 0.f ? 1.f / l : 0.f;
    if (qi < p.Lq) p.lse[bh * p.Lq + qi] = l > 0.f ? (m + log2f(l)) * kLn2 : -INFINITY;
  }
  __syncwarp();
  const int rows = imin(16, p.Lq - q0 - warp * 16);
  T* out = p.out + (bh * p.Lq + q0 + warp * 16) * p.D;
  for (int e = lane; e < rows * p.D; e += 32) {
    const int rr = e / p.D, d = e - rr * p.D;
    out[e] = Conv<T>::from(sO[rr * C::kLdO + d] * sInv[warp * 16 + rr]);
  }
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads) attention_bwd_dq_kernel(const Params<T> p) {
  using C = Cfg<T, DMAX>;
  using L = DqSmem<T, DMAX>;
  SBT_DYNAMIC_SMEM(smem);
  const BlockPos at = block_pos(p);
  const BwdTiles<T> sm = bwd_tiles<T, C, L>(smem, at.warp);
  const int lane = at.lane, warp = at.warp;
  const int q0 = at.tile * kRows, qvalid = imin(kRows, p.Lq - q0);
  constexpr int BN = C::kBN;  // keys per step

  load_backward_rows<T, C::kLdT>(p, at, q0, kRows, qvalid, sm.q, sm.dout, sm.l2, sm.delta);
  __syncthreads();

  const int diag = p.Lk - p.Lq;
  const int nfo = p.d16 / 16;
  WarpTile<T, DMAX / 16> dq;
  dq.zero();

  for_each_key_tile<T, BN, C::kLdT>(p, at, q0, qvalid, sm.k, sm.v, sm.ok, [&](int kg0) {
    const int w = warp * 16 * C::kLdT;
    scores_and_dp<T, BN / 16, C>(sm, sm.q + w, sm.k, sm.dout + w, sm.v, p.d16);

    for (int e = lane; e < 16 * BN; e += 32) {
      const int rr = e / BN, j = e - rr * BN;
      const int row = warp * 16 + rr;
      const float l2 = sm.l2[row];
      const bool ok = sm.ok[j] && l2 != -INFINITY && (!p.causal || kg0 + j <= q0 + row + diag);
      const float pv = ok ? exp2f(sm.s[rr * C::kLdS + j] * p.scale_log2 - l2) : 0.f;
      sm.ds[rr * C::kLdP + j] = Conv<T>::from(pv * (sm.dp[rr * C::kLdS + j] - sm.delta[row]));
    }
    __syncwarp();
    dq.template mma<false>(sm.ds, C::kLdP, sm.k, C::kLdT, BN, nfo);
  });
  write_rows(dq, p.dq + (at.bh * p.Lq + q0 + warp * 16) * p.D, p.D, imin(16, qvalid - warp * 16),
             p.D, p.scale, sm.s, C::kLdS);
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(kThreads) attention_bwd_dkdv_kernel(const Params<T> p) {
  using C = Cfg<T, DMAX>;
  using L = DkvSmem<T, DMAX>;
  SBT_DYNAMIC_SMEM(smem);
  const BlockPos at = block_pos(p);  // at.tile: the key tile, numbered across chunks
  const BwdTiles<T> sm = bwd_tiles<T, C, L>(smem, at.warp);
  const int lane = at.lane, warp = at.warp;
  constexpr int BQ = C::kBN;  // queries per step
  int c = 0;
  while (c + 1 < p.n_chunks && at.tile >= p.tile0[c + 1]) ++c;
  const int t0 = (at.tile - p.tile0[c]) * kRows;
  const int kg0 = p.off[c] + t0, kvalid = imin(kRows, p.len[c] - t0);
  T* sP = smem_at<T>(smem, L::p) + warp * 16 * C::kLdP;

  load_keys<T, kRows, C::kLdT>(p, c, at.b, at.h, t0, sm.k, sm.v, sm.ok);

  const int diag = p.Lk - p.Lq;
  const int nfo = p.d16 / 16;
  WarpTile<T, DMAX / 16> dk, dv;
  dk.zero();
  dv.zero();
  // Under causality the first query that sees key kg0 is kg0 - diag.
  int q_begin = p.causal ? imax(0, kg0 - diag) : 0;
  q_begin -= q_begin % BQ;

  for (int q0 = q_begin; q0 < p.Lq; q0 += BQ) {
    const int qvalid = imin(BQ, p.Lq - q0);
    __syncthreads();
    load_backward_rows<T, C::kLdT>(p, at, q0, BQ, qvalid, sm.q, sm.dout, sm.l2, sm.delta);
    __syncthreads();

    // Transposed scores: rows are this warp's keys, columns the queries of the tile.
    const int w = warp * 16 * C::kLdT;
    scores_and_dp<T, BQ / 16, C>(sm, sm.k + w, sm.q, sm.v + w, sm.dout, p.d16);

    for (int e = lane; e < 16 * BQ; e += 32) {
      const int rr = e / BQ, i = e - rr * BQ;
      const float l2 = sm.l2[i];
      const bool ok = sm.ok[warp * 16 + rr] && l2 != -INFINITY &&
                      (!p.causal || kg0 + warp * 16 + rr <= q0 + i + diag);
      const float pv = ok ? exp2f(sm.s[rr * C::kLdS + i] * p.scale_log2 - l2) : 0.f;
      sP[rr * C::kLdP + i] = Conv<T>::from(pv);
      sm.ds[rr * C::kLdP + i] = Conv<T>::from(pv * (sm.dp[rr * C::kLdS + i] - sm.delta[i]));
    }
    __syncwarp();
    dv.template mma<false>(sP, C::kLdP, sm.dout, C::kLdT, BQ, nfo);
    dk.template mma<false>(sm.ds, C::kLdP, sm.q, C::kLdT, BQ, nfo);
  }
  const int rows = imin(16, kvalid - warp * 16);
  const int64_t first = (at.bh * p.len[c] + t0 + warp * 16) * p.D;
  write_rows(dk, p.dk[c] + first, p.D, rows, p.D, p.scale, sm.s, C::kLdS);
  write_rows(dv, p.dv[c] + first, p.D, rows, p.D, 1.f, sm.s, C::kLdS);
}

// ---- Host side shared by the CUDA entry points and the CPU emulator of the tests ----

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}, std::integral_constant<int, DMAX>{}) for the device type of `dtype`
// and the head-dim bucket of D (64 or 128).
template <typename F>
void dispatch(at::ScalarType dtype, int64_t D, F&& f) {
  auto with_dim = [&](auto tag) {
    if (D <= 64)
      f(tag, std::integral_constant<int, 64>{});
    else
      f(tag, std::integral_constant<int, 128>{});
  };
  switch (dtype) {
    case at::kFloat:
      with_dim(TypeTag<float>{});
      break;
    case at::kHalf:
      with_dim(TypeTag<__half>{});
      break;
    case at::kBFloat16:
      with_dim(TypeTag<__nv_bfloat16>{});
      break;
    default:
      unsupported_dtype("attention", dtype);
  }
}

// Pointers and strides of already-checked inputs; set_forward_outputs / set_backward_args add
// the rest.
template <typename T>
Params<T> make_params(const at::Tensor& q, const std::vector<at::Tensor>& ks,
                      const std::vector<at::Tensor>& vs, const c10::optional<at::Tensor>& mask,
                      bool causal, double scale) {
  Params<T> p{};
  auto ptr = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); };
  p.q = ptr(q);
  p.q_sb = q.stride(0);
  p.q_sh = q.stride(1);
  p.q_sl = q.stride(2);
  p.n_chunks = static_cast<int>(ks.size());
  int off = 0, tiles = 0;
  for (int c = 0; c < p.n_chunks; ++c) {
    p.k[c] = ptr(ks[c]);
    p.v[c] = ptr(vs[c]);
    p.k_sb[c] = ks[c].stride(0);
    p.k_sh[c] = ks[c].stride(1);
    p.k_sl[c] = ks[c].stride(2);
    p.v_sb[c] = vs[c].stride(0);
    p.v_sh[c] = vs[c].stride(1);
    p.v_sl[c] = vs[c].stride(2);
    p.len[c] = static_cast<int>(ks[c].size(2));
    p.off[c] = off;
    p.tile0[c] = tiles;
    off += p.len[c];
    tiles += (p.len[c] + kRows - 1) / kRows;
  }
  p.tile0[p.n_chunks] = tiles;
  p.mask = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  p.H = static_cast<int>(q.size(1));
  p.Lq = static_cast<int>(q.size(2));
  p.Lk = off;
  p.D = static_cast<int>(q.size(3));
  p.d16 = (p.D + 15) / 16 * 16;
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  return p;
}

template <typename T>
void set_forward_outputs(Params<T>& p, const at::Tensor& out, const at::Tensor& lse) {
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.lse = lse.data_ptr<float>();
}

template <typename T>
void set_backward_args(Params<T>& p, const at::Tensor& lse, const at::Tensor& dout,
                       const at::Tensor& delta, const at::Tensor& dq,
                       const std::vector<at::Tensor>& dks, const std::vector<at::Tensor>& dvs) {
  p.dout = reinterpret_cast<const T*>(dout.data_ptr());
  p.do_sb = dout.stride(0);
  p.do_sh = dout.stride(1);
  p.do_sl = dout.stride(2);
  p.lse = const_cast<float*>(lse.data_ptr<float>());  // only read by the backward kernels
  p.delta = delta.data_ptr<float>();
  p.dq = reinterpret_cast<T*>(dq.data_ptr());
  for (size_t c = 0; c < dks.size(); ++c) {
    p.dk[c] = reinterpret_cast<T*>(dks[c].data_ptr());
    p.dv[c] = reinterpret_cast<T*>(dvs[c].data_ptr());
  }
}

inline int64_t query_tiles(int64_t Lq) { return (Lq + kRows - 1) / kRows; }

// launch(kernel, blocks, dynamic smem bytes, params) runs one grid of kThreads-thread blocks.
template <typename T, int DMAX, typename Launch>
void run_fwd(Params<T> p, int64_t BH, Launch&& launch) {
  p.n_tiles = static_cast<int>(query_tiles(p.Lq));
  launch(attention_fwd_kernel<T, DMAX>, p.n_tiles * BH, FwdSmem<T, DMAX>::bytes, p);
}

template <typename T, int DMAX, typename Launch>
void run_bwd(Params<T> p, int64_t BH, Launch&& launch) {
  p.n_tiles = p.tile0[p.n_chunks];
  launch(attention_bwd_dkdv_kernel<T, DMAX>, p.n_tiles * BH, DkvSmem<T, DMAX>::bytes, p);
  p.n_tiles = static_cast<int>(query_tiles(p.Lq));
  launch(attention_bwd_dq_kernel<T, DMAX>, p.n_tiles * BH, DqSmem<T, DMAX>::bytes, p);
}

}  // namespace attention
}  // namespace sbt
