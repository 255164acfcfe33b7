// Batch-1..8 int4 GEMV on tensor cores: out[m, n] = sum_k x[m, k] * (q[n, k] - z) * s.
// Python side, layout and reasoning: rtllm/kernels/quant_gemv_mma.py.
//
// Compile-time parameters (-D): IS_BF16 (x, bias, out are bf16, else fp16), SCALE_BF16
// (scales / zeros are bf16, else fp16), STEP_BLOCKS (4-word blocks per pipeline step),
// STAGES (steps in flight), GROUP_BLOCKS (blocks per quantization group, 0: per
// channel), GATED ([gate; up] weight, silu(gate) * up written), HAS_BIAS, EARLY_STEPS
// (weight steps issued before waiting for the previous kernel, default 1).
//
// A CTA takes tiles of 16 weight rows in turn (persistent); each warp a K slice of them. Per step a warp copies its
// 16 rows x STEP_BLOCKS blocks (16 bytes each) into shared memory with cp.async, then
// each lane (g = lane / 4, q = lane % 4) dequantizes word q of every block for rows g
// and g + 8 and issues two m16n8k16 MMAs per block with the weights as the A operand
// and up to 8 rows of x as the B operand's columns.
//
// No CUDA headers are included (NVRTC ships none): 16-bit values travel as raw bits.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#if IS_BF16
#define MAGIC_PAIR 0x43004300u  // bf16 128.0 in both halves: 128 + 2q is exact
#define MAGIC_F 128.0f
#define MMA_TYPE "bf16"
#else
#define MAGIC_PAIR 0x64006400u  // fp16 1024.0 in both halves: 1024 + 2q is exact
#define MAGIC_F 1024.0f
#define MMA_TYPE "f16"
#endif

#ifndef EARLY_STEPS
#define EARLY_STEPS 1  // weight steps issued before waiting for the previous kernel
#endif
#define W_ROW (4 * STEP_BLOCKS + 4)  // words per weight row in a stage (+4: no bank conflicts)
#define GROUPS_PER_STEP ((GROUP_BLOCKS == 0 || GROUP_BLOCKS >= STEP_BLOCKS) ? 1 : STEP_BLOCKS / GROUP_BLOCKS)
#define STAGE_WORDS (16 * W_ROW + 16 * GROUPS_PER_STEP)
#define STEP_CHUNKS (16 * STEP_BLOCKS + 4 * GROUPS_PER_STEP)
#define COPY_ROUNDS ((STEP_CHUNKS + 31) / 32)

__device__ __forceinline__ float half_bits_to_float(u32 h, bool bf16) {
  if (bf16) return __uint_as_float(h << 16);
  float f;
  asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "r"(h));
  return f;
}

__device__ __forceinline__ float x_to_float(u32 h) { return half_bits_to_float(h, IS_BF16); }

__device__ __forceinline__ u16 float_to_x(float f) {
  u16 h;
#if IS_BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
}

__device__ __forceinline__ u32 smem_addr(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; !valid: zero-fill without reading.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// d += A (16x16, the weights) * B (16x8, x), float32 accumulate.
__device__ __forceinline__ void mma(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// (a & 0x001E001E) | magic in one LOP3 (written in C, the compiler splits it in two:
// LOP3 has one immediate slot, so magic must come in a register).
__device__ __forceinline__ u32 and_or(u32 a, u32 magic) {
  u32 r;
  asm("lop3.b32 %0, %1, 0x001E001E, %2, 0xEA;" : "=r"(r) : "r"(a), "r"(magic));
  return r;
}

// Word w (stored rotated left by one bit, quant_layout.py) holds fields f0..f7. Pair p
// is (f_p, f_p+4) moved to bits 1..4 and 17..20 and or-ed into the magic pair: the
// 16-bit values MAGIC + 2 f (exact). One shift (none for p = 0) and one LOP3 per pair;
// f7 wraps around bit 31, hence the funnel shift for p = 3.
__device__ __forceinline__ void dequant_pairs(u32 w, u32 magic, u32* p) {
  p[0] = and_or(w, magic);
  p[1] = and_or(w >> 4, magic);
  p[2] = and_or(w >> 8, magic);
  p[3] = and_or(__funnelshift_r(w, w, 12), magic);
}

extern "C" __global__ void int4_gemv_mma(
    const u32* __restrict__ qweight,  // [N, K / 8] int32 words
    const u16* __restrict__ scales,   // [G, N]
    const u16* __restrict__ zeros,    // [G, N]
    const u16* __restrict__ x,        // [M, K], row stride stride_x
    const u16* __restrict__ bias,     // [N]
    u16* __restrict__ out,            // [M, N] (gated: [M, N / 2]), row stride stride_out
    int M, int N, int K, int stride_x, int stride_out, int blocks_per_warp) {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
  extern __shared__ __align__(16) u32 smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int words_per_row = K >> 3;
  const int num_blocks = K >> 5;
  // Tiles of 16 rows: rows lo = g (0..7) and hi = g + 8; gated: 8 gate rows and the
  // matching up rows, so one lane holds both factors of an output. A CTA takes tiles
  // blockIdx.x, + gridDim.x, ...; its warps' K slices (and x) are the same for all.
  const int num_tiles = N >> 4;
  const int my_tiles = num_tiles > (int)blockIdx.x ? (num_tiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
  auto row_lo = [&](int t) { return GATED ? t * 8 : t * 16; };
  auto row_hi = [&](int t) { return GATED ? (N >> 1) + t * 8 : t * 16 + 8; };

  // Per-warp shared memory: STAGES stages | x fragments | per-block x sums | group sums;
  // after all warps' regions, two buffers for the cross-warp reduction of a tile.
  const int slice_blocks = blocks_per_warp;
  const int num_intervals = GROUP_BLOCKS == 0 ? 1 : slice_blocks / GROUP_BLOCKS;
  const int warp_words = STAGES * STAGE_WORDS + M * slice_blocks * 16 + slice_blocks * 8 + num_intervals * 8;
  u32* stages = smem + warp * warp_words;
  uint4* xfrag = reinterpret_cast<uint4*>(stages + STAGES * STAGE_WORDS);
  float* block_sums = reinterpret_cast<float*>(stages + STAGES * STAGE_WORDS + M * slice_blocks * 16);
  float* group_sums = block_sums + slice_blocks * 8;
  float* red = reinterpret_cast<float*>(smem + num_warps * warp_words);

  // Every warp runs the same number of steps per tile (the CTA meets at a barrier per
  // tile); blocks past K are zero-filled, not read, and meet x == 0.
  const int blk0 = warp * blocks_per_warp;
  const int blk_end = min(blk0 + blocks_per_warp, num_blocks);
  const int num_steps = blocks_per_warp / STEP_BLOCKS;
  const int num_groups = GROUP_BLOCKS == 0 ? 1 : num_blocks / GROUP_BLOCKS;
  const int total_steps = my_tiles * num_steps;

  // One step's copies: 16 rows x STEP_BLOCKS blocks of weights, then per group of the
  // step the scales and zeros of the lo and hi rows (8 x 16 bits = 16 bytes each).
  // Chunk c = 32 i + lane is copied by lane in round i: weight rounds cover 32 /
  // STEP_BLOCKS rows each, so whether a round's rows are lo or hi is known at compile
  // time, and a lane's block (lane % STEP_BLOCKS) is the same in every round.
  const int chunk_block = lane % STEP_BLOCKS;
  const int lane_row = lane / STEP_BLOCKS;
  const int lane_off = lane_row * words_per_row + 4 * (blk0 + chunk_block);
  const u32 lane_dst = smem_addr(stages + lane_row * W_ROW + 4 * chunk_block);
  // The next step to copy: tile iteration, step in the tile, stage slot (counters, not
  // divisions: this runs every step).
  int next_tile = 0, next_step = 0, next_slot = 0;
  auto issue_next = [&]() {
    const int t = blockIdx.x + next_tile * gridDim.x;
    const int step = next_step;
    const u32 stage_off = next_slot * STAGE_WORDS * 4;
    next_slot = next_slot == STAGES - 1 ? 0 : next_slot + 1;
    if (++next_step == num_steps) {
      next_step = 0;
      ++next_tile;
    }
    const int blk = blk0 + step * STEP_BLOCKS;
    const bool valid = blk + chunk_block < blk_end;
    const u32* lo_rows = qweight + (size_t)row_lo(t) * words_per_row + lane_off + 4 * step * STEP_BLOCKS;
    const u32* hi_rows = qweight + (size_t)row_hi(t) * words_per_row + lane_off + 4 * step * STEP_BLOCKS;
#pragma unroll
    for (int i = 0; i < COPY_ROUNDS; ++i) {
      const int c = 32 * i + lane;
      if (32 * (i + 1) <= 16 * STEP_BLOCKS) {
        constexpr int ROWS = 32 / STEP_BLOCKS;  // rows per round
        const int r = i * ROWS;                 // the round's first row (compile time)
        const u32* src = (r >= 8 ? hi_rows : lo_rows) + (r & 7) * words_per_row;
        cp_async16(lane_dst + stage_off + r * W_ROW * 4, src, valid);
      } else if (c < STEP_CHUNKS) {
        // scales / zeros of group gi of the step (per channel: group 0 every step)
        const int cc = c - 16 * STEP_BLOCKS;
        const int gi = cc >> 2;
        const int grp = GROUP_BLOCKS == 0 ? 0 : (blk + gi * GROUP_BLOCKS) / (GROUP_BLOCKS == 0 ? 1 : GROUP_BLOCKS);
        const u16* src = ((cc & 2) ? zeros : scales) + (size_t)min(grp, num_groups - 1) * N;
        cp_async16(smem_addr(stages + 16 * W_ROW + 4 * cc) + stage_off, src + ((cc & 1) ? row_hi(t) : row_lo(t)), true);
      }
    }
  };

  // Prologue, in the order the requests queue up on the SM:
  // 1. EARLY_STEPS weight steps: constant, so under PDL they overlap the previous kernel;
  // 2. after waiting for the previous kernel, this lane's first block of x, into
  //    registers: it queues behind only the early steps;
  // 3. the other STAGES - 1 - EARLY_STEPS steps, then the x permutation below.
#pragma unroll
  for (int s = 0; s < EARLY_STEPS; ++s) {
    if (s < total_steps) issue_next();
    cp_async_commit();
  }
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  // Block (m, b) of this warp's x slice: zeros past K. (Loads from a clamped address,
  // then masks: zeroing the destination registers first would wait for the copies above
  // to have read their address registers.)
  auto load_x_block = [&](int m, int b, uint4* xv) {
    const bool in_k = m < M && b < slice_blocks && blk0 + b < blk_end;
    const size_t off = in_k ? (size_t)m * stride_x + (size_t)(blk0 + b) * 32 : 0;
#pragma unroll
    for (int v = 0; v < 4; ++v) xv[v] = reinterpret_cast<const uint4*>(x + off)[v];
    if (!in_k) {
#pragma unroll
      for (int v = 0; v < 4; ++v) xv[v] = make_uint4(0, 0, 0, 0);
    }
  };
  uint4 first_x[4];  // block (0, lane)
  load_x_block(0, lane, first_x);
#pragma unroll
  for (int s = EARLY_STEPS; s < STAGES - 1; ++s) {
    if (s < total_steps) issue_next();
    cp_async_commit();
  }

  // x fragments: for block b and x row m, lane quad q's B operands are
  // (x[q], x[16+q]), (x[4+q], x[20+q]) (first MMA), (x[8+q], x[24+q]), (x[12+q], x[28+q])
  // (second MMA) of the block's 32 channels, matching dequant_pairs' pairs of word q.
  // Channels past the slice read as zero, so their weights add nothing.
  for (int m = 0; m < M; ++m) {
    for (int b = lane; b < slice_blocks; b += 32) {
      uint4 xv[4];
      if (m == 0 && b == lane) {
#pragma unroll
        for (int v = 0; v < 4; ++v) xv[v] = first_x[v];
      } else {
        load_x_block(m, b, xv);
      }
      u32 r[16];
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        r[4 * v] = xv[v].x; r[4 * v + 1] = xv[v].y; r[4 * v + 2] = xv[v].z; r[4 * v + 3] = xv[v].w;
      }
      float part[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int v = 0; v < 16; ++v) part[v & 3] += x_to_float(r[v] & 0xFFFFu) + x_to_float(r[v] >> 16);
      block_sums[b * 8 + m] = (part[0] + part[1]) + (part[2] + part[3]);
#pragma unroll
      for (int qq = 0; qq < 4; ++qq) {
        u32 f[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          // channels c = 4 j + qq (low half) and c + 16 (high half); x[c] is half c % 2 of r[c / 2]
          const int c = 4 * j + qq, d = c + 16;
          const u32 sel = ((c & 1) ? 0x32u : 0x10u) | ((d & 1) ? 0x7600u : 0x5400u);
          f[j] = __byte_perm(r[c >> 1], r[d >> 1], sel);
        }
        xfrag[(m * slice_blocks + b) * 4 + qq] = make_uint4(f[0], f[1], f[2], f[3]);
      }
    }
  }
  __syncwarp();
  // x sums per flush interval (a group, or the slice when per channel) and column; the
  // columns past M repeat row M - 1, as the lanes reading x do.
  for (int i = lane; i < num_intervals * 8; i += 32) {
    const int iv = i >> 3, col = i & 7, m = min(col, M - 1);
    const int len = GROUP_BLOCKS == 0 ? slice_blocks : GROUP_BLOCKS;
    float sum = 0.f;
    for (int b = iv * len; b < (iv + 1) * len; ++b) sum += block_sums[b * 8 + m];
    group_sums[i] = sum;
  }
  __syncwarp();

  // d: this group's MMA sums of (MAGIC + 2q) x; acc += s / 2 * (d - (MAGIC + 2z) * sum x).
  float acc[4], d[4], e[4];  // d: the first MMA of each block, e: the second (two chains)
  float s_lo, s_hi, zz_lo, zz_hi, sx0, sx1;
  int interval;
  const int xm = min(g, M - 1);
  // In a register (see and_or); the empty asm keeps the compiler from folding it back.
  u32 magic = MAGIC_PAIR;
  asm volatile("" : "+r"(magic));
  const uint4* x_lane = xfrag + xm * slice_blocks * 4 + q;
  auto flush = [&]() {
    acc[0] += s_lo * fmaf(-zz_lo, sx0, d[0] + e[0]);
    acc[1] += s_lo * fmaf(-zz_lo, sx1, d[1] + e[1]);
    acc[2] += s_hi * fmaf(-zz_hi, sx0, d[2] + e[2]);
    acc[3] += s_hi * fmaf(-zz_hi, sx1, d[3] + e[3]);
    d[0] = d[1] = d[2] = d[3] = 0.f;
    e[0] = e[1] = e[2] = e[3] = 0.f;
  };
  auto start_group = [&](const u32* st, int gi) {
    flush();
    const u16* sz = reinterpret_cast<const u16*>(st + 16 * W_ROW + 16 * gi);
    s_lo = 0.5f * half_bits_to_float(sz[g], SCALE_BF16);
    s_hi = 0.5f * half_bits_to_float(sz[8 + g], SCALE_BF16);
    zz_lo = fmaf(2.f, half_bits_to_float(sz[16 + g], SCALE_BF16), MAGIC_F);
    zz_hi = fmaf(2.f, half_bits_to_float(sz[24 + g], SCALE_BF16), MAGIC_F);
    const float2 sx = *reinterpret_cast<const float2*>(group_sums + interval * 8 + 2 * q);
    sx0 = sx.x;
    sx1 = sx.y;
    ++interval;
  };

  int step = 0, tile_iter = 0, slot = 0;
  for (int flat = 0; flat < total_steps; ++flat) {
    if (step == 0) {  // a new tile
      acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
      d[0] = d[1] = d[2] = d[3] = 0.f;
      e[0] = e[1] = e[2] = e[3] = 0.f;
      s_lo = s_hi = zz_lo = zz_hi = sx0 = sx1 = 0.f;
      interval = 0;
    }
    cp_async_wait<STAGES - 2>();
    __syncwarp();  // every lane's copies of this step landed; the oldest stage is free
    if (flat + STAGES - 1 < total_steps) issue_next();
    cp_async_commit();
    const u32* st = stages + slot * STAGE_WORDS;
    slot = slot == STAGES - 1 ? 0 : slot + 1;
    const u32* w_lane = st + g * W_ROW + q;
    const uint4* x_step = x_lane + step * STEP_BLOCKS * 4;
#pragma unroll
    for (int b = 0; b < STEP_BLOCKS; ++b) {
      if (GROUP_BLOCKS == 0) {
        if (step == 0 && b == 0) start_group(st, 0);
      } else if (GROUP_BLOCKS <= STEP_BLOCKS) {
        if (b % (GROUP_BLOCKS == 0 ? 1 : GROUP_BLOCKS) == 0) start_group(st, b / (GROUP_BLOCKS == 0 ? 1 : GROUP_BLOCKS));
      } else if (b == 0 && (step * STEP_BLOCKS) % (GROUP_BLOCKS == 0 ? 1 : GROUP_BLOCKS) == 0) {
        start_group(st, 0);
      }
      u32 lo[4], hi[4];
      dequant_pairs(w_lane[4 * b], magic, lo);
      dequant_pairs(w_lane[8 * W_ROW + 4 * b], magic, hi);
      const uint4 xf = x_step[4 * b];
      mma(d, lo[0], hi[0], lo[1], hi[1], xf.x, xf.y);
      mma(e, lo[2], hi[2], lo[3], hi[3], xf.z, xf.w);
    }
    if (step == num_steps - 1) {
      // The tile is done: sum the warps' partials (lane (g, q) holds rows g / g + 8,
      // columns 2q, 2q + 1) through one of two buffers, so the next tile's writes
      // cannot meet this tile's reads.
      flush();
      const int t = blockIdx.x + tile_iter * gridDim.x;
      float* buf = red + (tile_iter & 1) * num_warps * 128;
      *reinterpret_cast<float4*>(buf + (warp * 32 + lane) * 4) = make_float4(acc[0], acc[1], acc[2], acc[3]);
      __syncthreads();
      const int outputs = GATED ? 64 : 128;
      for (int i = threadIdx.x; i < outputs; i += blockDim.x) {
        const int col = i & 7;
        if (col >= M) continue;
        const int r = i >> 3;  // tile row 0..15 (gated: 0..7, the gate row; + 8 its up row)
        const int src_lane = (r & 7) * 4 + (col >> 1);
        const int e = (r >= 8 ? 2 : 0) + (col & 1);
        float total = 0.f;
        for (int w = 0; w < num_warps; ++w) total += buf[(w * 32 + src_lane) * 4 + e];
        if (GATED) {
          float up = 0.f;
          for (int w = 0; w < num_warps; ++w) up += buf[(w * 32 + src_lane) * 4 + 2 + (col & 1)];
          if (HAS_BIAS) {
            total += x_to_float(bias[row_lo(t) + r]);
            up += x_to_float(bias[row_hi(t) + r]);
          }
          // As the separate activation kernel: gate and up rounded to the output dtype first.
          const float gate = x_to_float(float_to_x(total));
          up = x_to_float(float_to_x(up));
          const float y = gate / (1.f + __expf(-gate)) * up;
          out[(size_t)col * stride_out + row_lo(t) + r] = float_to_x(y);
        } else {
          const int row = row_lo(t) + r;  // row_hi(t) == row_lo(t) + 8
          if (HAS_BIAS) total += x_to_float(bias[row]);
          out[(size_t)col * stride_out + row] = float_to_x(total);
        }
      }
      step = 0;
      ++tile_iter;
    } else {
      ++step;
    }
  }
  cp_async_wait<0>();
}
