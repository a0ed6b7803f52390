// Image preprocessing (SAM + CLIP inputs from one uint8 image, one launch) and SAM mask
// postprocessing (low-res logits -> original-size logits and masks, one launch).
//
// Torch-free C API: extern "C" functions taking raw device pointers and a cudaStream_t, returning
// a cudaError_t as int (0 = success). Loaded with ctypes by kernels/preprocess.py, which wraps
// them as torch.library custom ops and holds the plain-torch reference of each function.
//
// Caveats
// - Bilinear convention: torch's F.interpolate(mode="bilinear", align_corners=False,
//   antialias=False) on float values (half-pixel centres, source index clamped at 0, no
//   antialias). SAM's own preprocessing resizes the uint8 image with PIL (bilinear with an
//   antialias support when shrinking, result rounded to uint8), and CLIP's resizes with bicubic;
//   both differ slightly from this (measured in tests/test_preprocess.py). Without antialias,
//   shrinking by a large factor (a 4000 px photo to 224) aliases.
// - The index arithmetic mirrors torch's CUDA upsample_bilinear2d (float scale in/out computed on
//   the host, source = fma(scale, dst + 0.5, -0.5)) so results agree with torch on the GPU to
//   float rounding; torch's CPU kernel does not fuse the multiply-add, so CPU results can differ
//   in rare pixels by one float ulp of the source coordinate.
// - Normalisation uses correctly rounded division (__fdiv_rn) like torch's (x - mean) / std, even
//   though the library is built with --use_fast_math.
// - Inputs must be contiguous: the image HWC uint8, the low-res logits (P, K, lh, lw) float32.
//   mean/std arguments are HOST pointers to 3 floats, read during the call (they become kernel
//   parameters, so a CUDA graph capture bakes them in).
// - The library links the CUDA runtime statically; streams and device pointers from torch's
//   runtime are driver-level objects and valid here. The kernel runs on the device current to the
//   calling thread (torch's current device).
// - Built (CMakeLists.txt) as SASS for sm_80/89/90 plus PTX for compute_75 (any newer GPU JITs
//   it). The runtime of the nvcc that builds it sets the oldest driver it runs on (nvcc 13.0:
//   R580); fsc_probe says, before any launch, whether it can run here, and the Python side falls
//   back to plain torch (logged once) when it cannot.

#include <cuda_runtime.h>
#include <stdint.h>

#define FSC_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kBlockX = 32;  // one warp along a row: coalesced float stores
constexpr int kBlockY = 8;

// One output coordinate's two source taps and weights along one axis.
struct Taps {
  int i0, i1;
  float w0, w1;
};

// torch's area_pixel_compute_source_index(scale, dst, align_corners=false, cubic=false) and the
// tap selection of upsample_bilinear2d: src = max(scale * (dst + 0.5) - 0.5, 0), i0 = floor(src),
// i1 = i0 + 1 clamped to the last index, w1 = src - i0.
__device__ __forceinline__ Taps linear_taps(int dst, float scale, int in_size) {
  float src = __fmaf_rn(scale, static_cast<float>(dst) + 0.5f, -0.5f);
  src = src < 0.f ? 0.f : src;
  const int i0 = static_cast<int>(src);
  const int i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  const float w1 = src - static_cast<float>(i0);
  return {i0, i1, 1.f - w1, w1};
}

// Same bracketing as torch's kernel: h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d).
__device__ __forceinline__ float blend(const Taps& ty, const Taps& tx, float a, float b, float c,
                                       float d) {
  return ty.w0 * (tx.w0 * a + tx.w1 * b) + ty.w1 * (tx.w0 * c + tx.w1 * d);
}

struct Norm3 {
  float mean[3];
  float std[3];
};

// One resampled output: an (out_side x out_side) CHW float plane set whose valid (h x w) part is
// the image resized to (rh x rw), read from (y + oy, x + ox), normalised as (v / div - mean) / std;
// everything outside the valid part is 0 (SAM's padding after normalisation).
struct Target {
  float* out;
  int side;        // output is 3 x side x side
  int h, w;        // valid region written from the image; the rest is zero
  int oy, ox;      // crop offset into the resized (rh x rw) frame (CLIP centre crop; 0 for SAM)
  float sy, sx;    // H / rh, W / rw
  float div;       // 1 (SAM, 0..255 units) or 255 (CLIP: v / 255 first, like torch's x.div(255))
  Norm3 norm;
  int tiles_x, tiles;  // tiles of kBlockX x kBlockY covering side x side
};

__device__ __forceinline__ void write_pixel(const uint8_t* __restrict__ img, int H, int W, int C,
                                            const Target& t, int x, int y) {
  const size_t plane = static_cast<size_t>(t.side) * t.side;
  const size_t o = static_cast<size_t>(y) * t.side + x;
  if (y >= t.h || x >= t.w) {
    t.out[o] = 0.f;
    t.out[plane + o] = 0.f;
    t.out[2 * plane + o] = 0.f;
    return;
  }
  const Taps ty = linear_taps(y + t.oy, t.sy, H);
  const Taps tx = linear_taps(x + t.ox, t.sx, W);
  const uint8_t* r0 = img + static_cast<size_t>(ty.i0) * W * C;
  const uint8_t* r1 = img + static_cast<size_t>(ty.i1) * W * C;
  const int c0 = tx.i0 * C, c1 = tx.i1 * C;
#pragma unroll
  for (int c = 0; c < 3; ++c) {
    const int k = C == 1 ? 0 : c;  // grayscale replicated; RGBA's alpha never read
    float v = blend(ty, tx, r0[c0 + k], r0[c1 + k], r1[c0 + k], r1[c1 + k]);
    if (t.div != 1.f) v = __fdiv_rn(v, t.div);
    t.out[c * plane + o] = __fdiv_rn(v - t.norm.mean[c], t.norm.std[c]);
  }
}

// One tile of one target.
__device__ __forceinline__ void write_tile(const uint8_t* __restrict__ img, int H, int W, int C,
                                           const Target& t, int tile) {
  const int x = (tile % t.tiles_x) * kBlockX + threadIdx.x;
  const int y = (tile / t.tiles_x) * kBlockY + threadIdx.y;
  if (x < t.side && y < t.side) write_pixel(img, H, W, C, t, x, y);
}

// A 1-D grid of 2-D tiles: the first sam.tiles blocks write the SAM input, the rest the CLIP
// input, so both outputs come from one launch without idle blocks (a blockIdx.z split would
// launch 1024x1024 worth of blocks for the 224x224 output too). Two explicit branches, each on
// its own kernel parameter: a reference chosen at run time (``cond ? sam : clip``) made the
// compiler copy both structs to a 144-byte stack frame (ptxas -v, nvcc 13.0); this way each
// branch reads its parameters in place (31 registers, no stack).
__global__ void __launch_bounds__(kBlockX* kBlockY)
    preprocess_kernel(const uint8_t* __restrict__ img, int H, int W, int C, Target sam,
                      Target clip) {
  const int tile = blockIdx.x;
  if (tile < sam.tiles) {
    write_tile(img, H, W, C, sam, tile);
  } else {
    write_tile(img, H, W, C, clip, tile - sam.tiles);
  }
}

// SAM's postprocess_masks, per output pixel: stage 1 upsamples (lh, lw) to (pad, pad); the crop
// keeps rows < input_h and columns < input_w (indices unchanged); stage 2 resizes that crop to
// (out_h, out_w). An output pixel reads 2x2 stage-1 values, each a 2x2 blend of low-res logits:
// 16 taps, no (pad x pad) intermediate in memory. The taps depend only on (x, y), so each
// thread walks several planes with them.
__global__ void __launch_bounds__(kBlockX* kBlockY)
    postprocess_kernel(const float* __restrict__ low, int planes, int lh, int lw, float s1y,
                       float s1x, int in_h, int in_w, float s2y, float s2x, int out_h, int out_w,
                       float threshold, float* __restrict__ logits, uint8_t* __restrict__ masks) {
  const int x = blockIdx.x * kBlockX + threadIdx.x;
  const int y = blockIdx.y * kBlockY + threadIdx.y;
  if (x >= out_w || y >= out_h) return;
  const Taps ay = linear_taps(y, s2y, in_h);  // rows of the cropped stage-1 frame
  const Taps ax = linear_taps(x, s2x, in_w);
  const Taps ry0 = linear_taps(ay.i0, s1y, lh), ry1 = linear_taps(ay.i1, s1y, lh);
  const Taps cx0 = linear_taps(ax.i0, s1x, lw), cx1 = linear_taps(ax.i1, s1x, lw);
  const size_t lplane = static_cast<size_t>(lh) * lw;
  const size_t oplane = static_cast<size_t>(out_h) * out_w;
  const size_t o = static_cast<size_t>(y) * out_w + x;
  for (int p = blockIdx.z; p < planes; p += gridDim.z) {
    const float* L = low + p * lplane;
    const float* a0 = L + static_cast<size_t>(ry0.i0) * lw;
    const float* a1 = L + static_cast<size_t>(ry0.i1) * lw;
    const float* b0 = L + static_cast<size_t>(ry1.i0) * lw;
    const float* b1 = L + static_cast<size_t>(ry1.i1) * lw;
    // stage-1 values at (row ay.i0 / ay.i1, column ax.i0 / ax.i1)
    const float v00 = blend(ry0, cx0, a0[cx0.i0], a0[cx0.i1], a1[cx0.i0], a1[cx0.i1]);
    const float v01 = blend(ry0, cx1, a0[cx1.i0], a0[cx1.i1], a1[cx1.i0], a1[cx1.i1]);
    const float v10 = blend(ry1, cx0, b0[cx0.i0], b0[cx0.i1], b1[cx0.i0], b1[cx0.i1]);
    const float v11 = blend(ry1, cx1, b0[cx1.i0], b0[cx1.i1], b1[cx1.i0], b1[cx1.i1]);
    const float v = blend(ay, ax, v00, v01, v10, v11);
    if (logits != nullptr) logits[p * oplane + o] = v;
    masks[p * oplane + o] = v > threshold ? 1 : 0;
  }
}

// torchvision's centre-crop offset int(round((size - crop) / 2.0)): Python rounds halves to even.
int centre_offset(int size, int crop) {
  const int d = size - crop;
  const int k = d / 2;
  return (d % 2 == 0 || k % 2 == 0) ? k : k + 1;
}

Target make_target(float* out, int side, int h, int w, int oy, int ox, int rh, int rw, int H,
                   int W, float div, const float* mean3, const float* std3) {
  Target t{};
  t.out = out;
  t.side = side;
  t.h = h;
  t.w = w;
  t.oy = oy;
  t.ox = ox;
  // torch's area_pixel_compute_scale: float(input) / output, on the host.
  t.sy = static_cast<float>(H) / static_cast<float>(rh);
  t.sx = static_cast<float>(W) / static_cast<float>(rw);
  t.div = div;
  for (int c = 0; c < 3; ++c) {
    t.norm.mean[c] = mean3[c];
    t.norm.std[c] = std3[c];
  }
  t.tiles_x = out != nullptr ? (side + kBlockX - 1) / kBlockX : 0;
  t.tiles = out != nullptr ? t.tiles_x * ((side + kBlockY - 1) / kBlockY) : 0;
  return t;
}

}  // namespace

// SAM input and CLIP input of one uint8 HWC image, one launch.
//   img        (H, W, C_in) uint8, contiguous; C_in 1 (replicated to RGB), 3, or 4 (alpha dropped)
//   sam_out    (3, sam_side, sam_side) float32: bilinear resize to (sam_h, sam_w) (the caller's
//              ResizeLongestSide shape), (v - sam_mean) / sam_std in 0..255 units, zero padding
//              bottom/right. nullptr skips it.
//   clip_out   (3, clip_side, clip_side) float32: bilinear resize so the shortest side is
//              clip_side (longest int(clip_side * long / short), as torchvision's Resize), centre
//              crop (torchvision's offsets), (v / 255 - clip_mean) / clip_std. nullptr skips it.
//   mean/std   host pointers to 3 floats each.
// Plain torch: kernels/preprocess.py preprocess_reference().
FSC_API int fsc_preprocess_u8(const uint8_t* img, int H, int W, int C_in, float* sam_out,
                              int sam_side, int sam_h, int sam_w, const float* sam_mean3,
                              const float* sam_std3, float* clip_out, int clip_side,
                              const float* clip_mean3, const float* clip_std3,
                              cudaStream_t stream) {
  // Checked before any CUDA call, so bad arguments are reported even without a GPU.
  if (img == nullptr || H <= 0 || W <= 0 || (C_in != 1 && C_in != 3 && C_in != 4))
    return cudaErrorInvalidValue;
  if (sam_out == nullptr && clip_out == nullptr) return cudaErrorInvalidValue;
  if (sam_out != nullptr &&
      (sam_side <= 0 || sam_h <= 0 || sam_w <= 0 || sam_h > sam_side || sam_w > sam_side ||
       sam_mean3 == nullptr || sam_std3 == nullptr))
    return cudaErrorInvalidValue;
  if (clip_out != nullptr && (clip_side <= 0 || clip_mean3 == nullptr || clip_std3 == nullptr))
    return cudaErrorInvalidValue;

  static const float kZero3[3] = {0.f, 0.f, 0.f}, kOne3[3] = {1.f, 1.f, 1.f};
  Target sam = sam_out != nullptr
                   ? make_target(sam_out, sam_side, sam_h, sam_w, 0, 0, sam_h, sam_w, H, W, 1.f,
                                 sam_mean3, sam_std3)
                   : make_target(nullptr, 0, 0, 0, 0, 0, 1, 1, H, W, 1.f, kZero3, kOne3);
  Target clip{};
  if (clip_out != nullptr) {
    // torchvision Resize(int): short side -> clip_side, long side int(clip_side * long / short)
    // (Python float division, truncated).
    const bool tall = H >= W;
    const int shortest = tall ? W : H, longest = tall ? H : W;
    const int resized_long =
        static_cast<int>(static_cast<double>(clip_side) * longest / static_cast<double>(shortest));
    const int rh = tall ? resized_long : clip_side;
    const int rw = tall ? clip_side : resized_long;
    if (resized_long < clip_side) return cudaErrorInvalidValue;  // unreachable for int sizes
    clip = make_target(clip_out, clip_side, clip_side, clip_side, centre_offset(rh, clip_side),
                       centre_offset(rw, clip_side), rh, rw, H, W, 255.f, clip_mean3, clip_std3);
  } else {
    clip = make_target(nullptr, 0, 0, 0, 0, 0, 1, 1, H, W, 1.f, kZero3, kOne3);
  }
  const int blocks = sam.tiles + clip.tiles;
  preprocess_kernel<<<blocks, dim3(kBlockX, kBlockY), 0, stream>>>(img, H, W, C_in, sam, clip);
  return static_cast<int>(cudaGetLastError());
}

// Whether this library's kernels can run on the current device: 0, or the cudaError_t a launch
// would meet, without launching anything. cudaErrorInsufficientDriver (35): the driver is older
// than the CUDA runtime this library links (nvcc 13.0's needs an R580 driver);
// cudaErrorNoKernelImageForDevice (209): neither SASS for this GPU nor PTX its driver can JIT.
//   runtime_version, driver_version: filled with CUDA's version encoding (13000 = 13.0; the
//   driver's is 0 without one) when not null.
FSC_API int fsc_probe(int* runtime_version, int* driver_version) {
  int rt = 0, drv = 0;
  cudaRuntimeGetVersion(&rt);
  cudaDriverGetVersion(&drv);
  if (runtime_version != nullptr) *runtime_version = rt;
  if (driver_version != nullptr) *driver_version = drv;
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, preprocess_kernel);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, postprocess_kernel);
  if (err != cudaSuccess) cudaGetLastError();  // leave no error behind for the next call
  return static_cast<int>(err);
}

// SAM's Sam.postprocess_masks fused with the threshold.
//   lowres     (P, K, lh, lw) float32 logits, contiguous
//   input_h/w  valid region of the (pad_side x pad_side) model input (SAM's input_size)
//   out_h/w    original image size
//   logits_out (P, K, out_h, out_w) float32, or nullptr to skip writing logits
//   mask_out   (P, K, out_h, out_w) uint8, 1 where logits > threshold
// Plain torch:
//   x = F.interpolate(lowres, (pad_side, pad_side), mode="bilinear", align_corners=False)
//   x = F.interpolate(x[..., :input_h, :input_w], (out_h, out_w), mode="bilinear",
//                     align_corners=False)
//   masks = x > threshold
FSC_API int fsc_postprocess_masks(const float* lowres, int P, int K, int lh, int lw, int input_h,
                                  int input_w, int pad_side, int out_h, int out_w,
                                  float threshold, float* logits_out_or_null, uint8_t* mask_out,
                                  cudaStream_t stream) {
  if (lowres == nullptr || mask_out == nullptr || P <= 0 || K <= 0 || lh <= 0 || lw <= 0 ||
      pad_side <= 0 || input_h <= 0 || input_w <= 0 || input_h > pad_side ||
      input_w > pad_side || out_h <= 0 || out_w <= 0)
    return cudaErrorInvalidValue;
  const int planes = P * K;
  // Up to 16 planes per thread-column of the grid: the tap arithmetic (4 calls of linear_taps)
  // is shared by those planes, while P * K / 16 z-blocks still fill the GPU for typical
  // 1-3 masks x up to 64 prompts at 1-4 Mpx.
  const int gz = planes < 65535 ? (planes + 15) / 16 : 4096;
  const dim3 grid((out_w + kBlockX - 1) / kBlockX, (out_h + kBlockY - 1) / kBlockY, gz);
  if (grid.y > 65535) return cudaErrorInvalidValue;  // out_h > 524280
  postprocess_kernel<<<grid, dim3(kBlockX, kBlockY), 0, stream>>>(
      lowres, planes, lh, lw, static_cast<float>(lh) / static_cast<float>(pad_side),
      static_cast<float>(lw) / static_cast<float>(pad_side), input_h, input_w,
      static_cast<float>(input_h) / static_cast<float>(out_h),
      static_cast<float>(input_w) / static_cast<float>(out_w), out_h, out_w, threshold,
      logits_out_or_null, mask_out);
  return static_cast<int>(cudaGetLastError());
}
