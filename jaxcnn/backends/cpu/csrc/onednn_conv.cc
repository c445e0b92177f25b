// 2-D float32 and bfloat16 convolutions for XLA's CPU backend, run by oneDNN (the library PyTorch's CPU
// convolutions use).
//
// Three XLA FFI handlers, one per convolution of a training step, all NHWC activations and HWIO kernels (the
// layouts jaxcnn uses, so nothing is transposed on the way in or out):
//   JaxcnnConvFwd        (x [N,H,W,Cin], w [KH,KW,Cin/G,Cout])    -> y  [N,Ho,Wo,Cout]
//   JaxcnnConvBwdData    (dy [N,Ho,Wo,Cout], w [KH,KW,Cin/G,Cout]) -> dx [N,H,W,Cin]
//   JaxcnnConvBwdWeights (x [N,H,W,Cin], dy [N,Ho,Wo,Cout])        -> dw [KH,KW,Cin/G,Cout]
// Each takes one int64 attribute "params" = [stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right,
// dilation_h, dilation_w, groups, threads] (dilation 1 = dense kernel, JAX's convention; threads = the OpenMP
// threads oneDNN may use, 0 = all; jaxcnn passes 1 when XLA runs several CPU devices at once, which would otherwise
// start one spinning OpenMP team per device).
//
// With threads = 0 a batch that splits evenly over XLA's intra-op thread pool runs as one slice per pool thread,
// each by a one-thread primitive (the filter gradient's slices summed), instead of one call on an OpenMP team: a
// team started from XLA's threads spins beside them when the call returns, and XLA calls custom calls from
// whichever of its threads is free, so several teams spin at once (LeNet-5's loop: 32.5k -> 37.5k images/s,
// ResNet-20's: 648 -> 686, in alternating A/B runs).
//
// oneDNN primitives are built once per geometry and kept in a process-wide cache (building one costs about a
// millisecond; running one costs less than that for small layers). Primitives run with the calling thread's own
// scratchpad (oneDNN's default shares one buffer between threads: wrong results when XLA runs several CPU devices
// at once), so one primitive may run in several threads at the same time. Kernels are passed in HWIO and reordered
// into the blocked layout oneDNN's JIT kernels want on every call (a few MB at most); the filter gradient is
// reordered back to HWIO.
//
// bfloat16 operands give bfloat16 results with float32 accumulation inside oneDNN (its AMX / AVX512-BF16 kernels,
// as PyTorch's autocast runs them); the filter gradient is computed in float32 (slices summed in float32) and
// rounded to bfloat16 once, to nearest even.
//
// Winograd: float32 3x3 convolutions with stride 1 and padding 1, channels in and out multiples of 16 up to
// kOwnWinogradChannels and outputs of whole 4x4 tiles run as jaxcnn's own Winograd F(4x4, 3x3) on NHWC (winograd.h;
// the filter gradient up to kOwnWinogradGradChannels), on AVX-512 CPUs. Of the others, those with at least
// kWinogradMinChannels channels in and out (multiples of 16) and outputs of whole 4x4 tiles (nearly whole from
// kWinogradWideChannels) run as oneDNN's Winograd F(4x4, 3x3) (jit_wino_4x3, AVX-512 only), which does 4x fewer
// multiplications; its kernels read and write the blocked nChw16c layout, so each call reorders its NHWC activations
// in and out, chunk by chunk of at most kWinogradChunk images. The same convolution with another order of float32
// sums: its error against a float64 reference is 2-6 times the direct kernels' (tests/backends/test_winograd.py).
// JAXCNN_WINOGRAD=0 turns both off (for A/B runs, or the direct kernels' results bit for bit). Figures:
// benchmarks/README.md.
//
// JaxcnnConvImpl(op, dims, error, error_len) builds (and caches) the primitive for a geometry and returns the name
// of the implementation oneDNN picked ("jaxcnn_winograd_f4x4_3x3" for jaxcnn's own Winograd), or nullptr with a
// message in `error`; jaxcnn calls it while tracing and keeps XLA's convolution for geometries oneDNN would run with
// its slow reference implementation.

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <new>
#include <mutex>
#include <string>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "bfloat16.h"
#include "env_switch.h"
#include "onednn_common.h"
#include "parallel_for.h"
#include "winograd.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

enum Op : int64_t { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// Winograd pays where the channels are many and little of the output is tile padding. Per call, one thread, from
// memory, ms direct / Winograd (forward, input gradient, filter gradient), 64 images unless said: 64 channels at
// 8x8 1.71 / 1.41, 2.05 / 1.39, 1.94 / 1.40; 32 at 16x16 1.92 / 1.85, 2.15 / 1.87, 1.86 / 1.81; 64 at 56x56, 16
// images, 19.9 / 14.5, 24.7 / 14.3, 23.5 / 14.7; 256 at 14x14, 16 images, 20.9 / 14.5, 24.2 / 13.8, 24.7 / 16.5;
// 64 at 7x7 1.38 / 1.31, 1.59 / 1.37, 1.48 / 1.28. Slower: 16 channels at 32x32 (2.36 / 3.35, 2.26 / 3.22,
// 2.18 / 2.56), 32 at 7x7 (0.68 / 0.92, 0.69 / 0.92, 0.71 / 1.11), 64 at 6x6 (0.86 / 1.21, 1.08 / 1.24,
// 1.13 / 1.19), 8 images of 8x8 (64 channels: 1.84 / 2.27).
// jaxcnn's own Winograd (winograd.h) against the direct kernels, per call, one thread, 64 images, ms (forward,
// input gradient, filter gradient): 16 channels at 32x32 1.81 / 1.15, 1.77 / 1.21, 1.41 / 1.60; 32 at 16x16 1.55 /
// 0.86, 1.62 / 0.88, 1.52 / 1.18; 64 at 8x8 1.45 / 0.78, 1.58 / 0.80, 1.58 / 1.10. In ResNet-20's step its 64-channel
// filter gradient was no faster than oneDNN's Winograd (profiled convolution time 96.9 against 93.5 ms), so that
// one stays oneDNN's.
constexpr int64_t kOwnWinogradChannels = 64;
constexpr int64_t kOwnWinogradGradChannels = 32;
constexpr int64_t kWinogradMinChannels = 32;
constexpr int64_t kWinogradWideChannels = 64;   // from here outputs of partial tiles (7x7, 14x14) pay too
constexpr int64_t kWinogradChunk = 64;            // images per reorder + Winograd call, at most
constexpr int64_t kWinogradMinChunkPixels = 1024;  // output pixels per call (chunk x Ho x Wo), at least

// JAXCNN_WINOGRAD, read once: 0 / false / no / off (any case, as JAXCNN_ONEDNN) turn Winograd off.
bool WinogradEnabled() {
  static const bool enabled = jaxcnn::SwitchOn("JAXCNN_WINOGRAD");
  return enabled;
}

struct Geometry {
  int64_t n, h, w, cin, kh, kw, cout, ho, wo, sh, sw, pt, pb, pl, pr, dh, dw, groups, threads;
  int64_t bf16 = 0;  // 1: bfloat16 activations and kernels (the filter gradient computed in float32)

  std::vector<int64_t> Key(Op op) const {
    return {op, n, h, w, cin, kh, kw, cout, ho, wo, sh, sw, pt, pb, pl, pr, dh, dw, groups, threads, bf16};
  }
  void SetThreads() const { jaxcnn::SetThreads(threads); }
  dt Data() const { return bf16 ? dt::bf16 : dt::f32; }
  memory::desc Src() const { return memory::desc({n, cin, h, w}, Data(), tag::nhwc); }
  memory::desc Dst() const { return memory::desc({n, cout, ho, wo}, Data(), tag::nhwc); }
  // HWIO as jaxcnn stores kernels (hwigo with groups), or `any`: the layout oneDNN prefers.
  memory::desc Weights(bool any, dt type) const {
    if (groups == 1) return memory::desc({cout, cin, kh, kw}, type, any ? tag::any : tag::hwio);
    return memory::desc({groups, cout / groups, cin / groups, kh, kw}, type, any ? tag::any : tag::hwigo);
  }
  memory::desc UserWeights() const { return Weights(false, Data()); }
  memory::desc AnyWeights() const { return Weights(true, Data()); }
  // The filter gradient's own type: float32 (bfloat16 operands accumulate into it, rounded once at the end).
  memory::desc UserDiffWeights() const { return Weights(false, dt::f32); }
  memory::desc AnyDiffWeights() const { return Weights(true, dt::f32); }
  int64_t WeightsSize() const { return kh * kw * (cin / groups) * cout; }
  // Bytes of one image of x and of y (the step between batch slices).
  int64_t XImageBytes() const { return h * w * cin * (bf16 ? 2 : 4); }
  int64_t YImageBytes() const { return ho * wo * cout * (bf16 ? 2 : 4); }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims Dilates() const { return {dh - 1, dw - 1}; }  // oneDNN counts the gaps, JAX the step
  memory::dims PadL() const { return {pt, pl}; }
  memory::dims PadR() const { return {pb, pr}; }

  // The images per Winograd call: the largest divisor of n up to kWinogradChunk.
  int64_t Chunk() const {
    for (int64_t c = std::min(n, kWinogradChunk); c > 1; --c) {
      if (n % c == 0) return c;
    }
    return 1;
  }
  // Whether this geometry runs as oneDNN's Winograd (the chunk's primitive, once n == Chunk()).
  bool Winograd() const {
    return WinogradShape() && std::min(cin, cout) >= kWinogradMinChannels && TilesPay() &&
           Chunk() * ho * wo >= kWinogradMinChunkPixels;
  }
  // Whether op runs as jaxcnn's own Winograd (winograd.h): up to kOwnWinogradChannels channels in and out
  // (kOwnWinogradGradChannels for the filter gradient), outputs of whole 4x4 tiles.
  bool OwnWinograd(Op op) const {
    const int64_t most = op == kBackwardWeights ? kOwnWinogradGradChannels : kOwnWinogradChannels;
    return WinogradShape() && std::max(cin, cout) <= most && ho % 4 == 0 && wo % 4 == 0 &&
           jaxcnn::winograd::Supported();
  }
  // What both Winograd kernels take (with JAXCNN_WINOGRAD not off): float32 3x3 convolutions with stride 1,
  // padding 1, no dilation or groups, channels in and out multiples of 16.
  bool WinogradShape() const {
    return WinogradEnabled() && !bf16 && groups == 1 && kh == 3 && kw == 3 && sh == 1 && sw == 1 && dh == 1 &&
           dw == 1 && pt == 1 && pb == 1 && pl == 1 && pr == 1 && cin % 16 == 0 && cout % 16 == 0;
  }
  // Whether the output's rows and columns, padded up to whole 4x4 tiles, waste little enough: none below
  // kWinogradWideChannels, at most 1/7 more per side from there (7x7 and 14x14 outputs: 8 and 16).
  bool TilesPay() const {
    auto tiled = [](int64_t v) { return (v + 3) / 4 * 4; };
    if (std::min(cin, cout) < kWinogradWideChannels) return ho % 4 == 0 && wo % 4 == 0;
    return 7 * tiled(ho) <= 8 * ho && 7 * tiled(wo) <= 8 * wo;
  }
};

using jaxcnn::Engine;

struct Entry {
  dnnl::primitive primitive;
  memory::desc scratchpad;     // user mode: each thread passes its own (see Build, ThreadBuffers)
  memory::desc reorder_scratchpad;
  memory::desc weights;        // the kernel layout the primitive reads (or writes, for the filter gradient)
  bool reorder = false;        // whether that layout differs from HWIO
  dnnl::reorder to_primitive;  // HWIO -> primitive layout (forward, input gradient)
  dnnl::reorder to_user;       // primitive layout -> HWIO (filter gradient)
  std::string impl;
  // Winograd: the blocked activation layouts its kernels read and write, and the NHWC <-> blocked reorders.
  bool blocked = false;
  memory::desc src, dst;                   // blocked x / dx and y / dy
  dnnl::reorder src_in, dst_in, src_out;   // NHWC x -> src, NHWC dy -> dst, src -> NHWC dx
  dnnl::reorder dst_out;                   // dst -> NHWC y
};

std::mutex cache_mutex;
std::map<std::vector<int64_t>, std::shared_ptr<Entry>> cache;

// The primitive for op with `algo`: convolution_direct on NHWC activations, or convolution_winograd on the
// blocked layouts its kernels choose (throws dnnl::error where oneDNN has no kernel for it).
std::shared_ptr<Entry> BuildWith(const Geometry& g, Op op, dnnl::algorithm algo) {
  auto e = std::make_shared<Entry>();
  // Scratchpad in user mode: oneDNN's library-mode scratchpad is one global buffer, unsafe when XLA runs the
  // computations of several CPU devices (pmap, shard_map, sharded jit) in parallel threads.
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const bool winograd = algo == dnnl::algorithm::convolution_winograd;
  const memory::desc src = winograd ? memory::desc({g.n, g.cin, g.h, g.w}, dt::f32, tag::any) : g.Src();
  const memory::desc dst = winograd ? memory::desc({g.n, g.cout, g.ho, g.wo}, dt::f32, tag::any) : g.Dst();
#if DNNL_VERSION_MAJOR >= 3  // oneDNN 3.x: primitive descriptors are built directly (the op descs are gone)
  dnnl::convolution_forward::primitive_desc fwd(Engine(), dnnl::prop_kind::forward_training, algo, src,
                                                g.AnyWeights(), dst, g.Strides(), g.Dilates(), g.PadL(), g.PadR(),
                                                attr);
#else
  dnnl::convolution_forward::desc fwd_desc(dnnl::prop_kind::forward_training, algo, src, g.AnyWeights(), dst,
                                           g.Strides(), g.Dilates(), g.PadL(), g.PadR());
  dnnl::convolution_forward::primitive_desc fwd(fwd_desc, attr, Engine());
#endif
  if (op == kForward) {
    e->primitive = dnnl::convolution_forward(fwd);
    e->src = fwd.src_desc();
    e->dst = fwd.dst_desc();
    e->weights = fwd.weights_desc();
    e->scratchpad = fwd.scratchpad_desc();
    e->impl = fwd.impl_info_str();
  } else if (op == kBackwardData) {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), algo, src, g.AnyWeights(), dst, g.Strides(),
                                                       g.Dilates(), g.PadL(), g.PadR(), fwd, attr);
#else
    dnnl::convolution_backward_data::desc d(algo, src, g.AnyWeights(), dst, g.Strides(), g.Dilates(), g.PadL(),
                                            g.PadR());
    dnnl::convolution_backward_data::primitive_desc pd(d, attr, Engine(), fwd);
#endif
    e->primitive = dnnl::convolution_backward_data(pd);
    e->src = pd.diff_src_desc();
    e->dst = pd.diff_dst_desc();
    e->weights = pd.weights_desc();
    e->scratchpad = pd.scratchpad_desc();
    e->impl = pd.impl_info_str();
  } else {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_weights::primitive_desc pd(Engine(), algo, src, g.AnyDiffWeights(), dst,
                                                          g.Strides(), g.Dilates(), g.PadL(), g.PadR(), fwd, attr);
#else
    dnnl::convolution_backward_weights::desc d(algo, src, g.AnyDiffWeights(), dst, g.Strides(), g.Dilates(),
                                               g.PadL(), g.PadR());
    dnnl::convolution_backward_weights::primitive_desc pd(d, attr, Engine(), fwd);
#endif
    e->primitive = dnnl::convolution_backward_weights(pd);
    e->src = pd.src_desc();
    e->dst = pd.diff_dst_desc();
    e->weights = pd.diff_weights_desc();
    e->scratchpad = pd.scratchpad_desc();
    e->impl = pd.impl_info_str();
  }
  memory::desc user = op == kBackwardWeights ? g.UserDiffWeights() : g.UserWeights();
  e->reorder = e->weights != user;
  if (e->reorder) {
    if (op == kBackwardWeights) {
      dnnl::reorder::primitive_desc pd(Engine(), e->weights, Engine(), user, attr);
      e->to_user = dnnl::reorder(pd);
      e->reorder_scratchpad = pd.scratchpad_desc();
    } else {
      dnnl::reorder::primitive_desc pd(Engine(), user, Engine(), e->weights, attr);
      e->to_primitive = dnnl::reorder(pd);
      e->reorder_scratchpad = pd.scratchpad_desc();
    }
  }
  e->blocked = e->src != g.Src() || e->dst != g.Dst();
  if (e->blocked) {  // plain layout changes, no scratchpad (checked: oneDNN gives them none)
    auto make = [&](const memory::desc& from, const memory::desc& to) {
      dnnl::reorder::primitive_desc pd(Engine(), from, Engine(), to, attr);
      if (pd.scratchpad_desc().get_size() != 0) throw dnnl::error(dnnl_runtime_error, "reorder needs a scratchpad");
      return dnnl::reorder(pd);
    };
    e->src_in = make(g.Src(), e->src);
    e->dst_in = make(g.Dst(), e->dst);
    e->src_out = make(e->src, g.Src());
    e->dst_out = make(e->dst, g.Dst());
  }
  return e;
}

std::shared_ptr<Entry> Build(const Geometry& g, Op op) {
  if (g.Winograd()) {
    try {
      return BuildWith(g, op, dnnl::algorithm::convolution_winograd);
    } catch (const dnnl::error&) {  // no Winograd kernel on this CPU or in this oneDNN: the direct one
    }
  }
  return BuildWith(g, op, dnnl::algorithm::convolution_direct);
}

std::shared_ptr<Entry> Get(const Geometry& g, Op op) {
  g.SetThreads();
  auto key = g.Key(op);
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto e = Build(g, op);
  cache.emplace(std::move(key), e);
  return e;
}

Geometry FromShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> w, ffi::Span<const int64_t> y,
                    ffi::Span<const int64_t> p, ffi::DataType type) {
  return Geometry{x[0], x[1], x[2], x[3], w[0], w[1], w[3], y[1], y[2],
                  p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], type == ffi::DataType::BF16};
}

// The calling thread's working memory for one primitive at a time: the blocked kernel, oneDNN's scratchpads and
// Winograd's blocked activations, each slot kept and grown to the largest size asked for. A fresh allocation per
// call pays its page faults every time (Winograd's scratchpad for 16 images of 56x56x64 is tens of MB), and a
// buffer per thread is never shared: XLA runs several devices' convolutions at once on different threads, and a
// thread runs one primitive at a time.
enum Slot { kWeightsSlot, kReorderScratchpadSlot, kSrcSlot, kDstSlot, kScratchpadSlot, kSlots };

class ThreadBuffers {
 public:
  memory Memory(Slot slot, const memory::desc& desc) {
    const size_t bytes = desc.get_size();
    Buffer& b = slots_[slot];
    if (bytes > b.size) {
      b.data.reset();
      b.data.reset(static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
      if (b.data == nullptr) throw std::bad_alloc();
      b.size = bytes;
    }
    return memory(desc, Engine(), bytes > 0 ? b.data.get() : nullptr);
  }

 private:
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  struct Buffer {
    std::unique_ptr<char, Free> data;
    size_t size = 0;
  };
  Buffer slots_[kSlots];
};

ThreadBuffers& Buffers() {
  thread_local ThreadBuffers buffers;
  return buffers;
}

// sum += part, n floats (filter gradients of batch slices).
void AddInto(float* sum, const float* part, int64_t n) {
  for (int64_t j = 0; j < n; ++j) sum[j] += part[j];
}

// One execution of op's primitive for geometry g on these buffers (x / dx, w / dw, y / dy as the op reads or
// writes them; dw is float32 for every data type), on the calling thread's OpenMP team (g.threads of them).
void Execute(const Geometry& g, Op op, void* x, void* w, void* y) {
  if (g.Winograd() && g.Chunk() < g.n) {  // Winograd chunk by chunk, the filter gradient's chunks summed
    Geometry chunk = g;
    chunk.n = g.Chunk();
    const int64_t x_step = chunk.n * g.XImageBytes(), y_step = chunk.n * g.YImageBytes();
    std::vector<float> part(op == kBackwardWeights ? g.WeightsSize() : 0);
    for (int64_t i = 0; i < g.n / chunk.n; ++i) {
      void* wi = op == kBackwardWeights && i > 0 ? part.data() : w;
      Execute(chunk, op, static_cast<char*>(x) + i * x_step, wi, static_cast<char*>(y) + i * y_step);
      if (op == kBackwardWeights && i > 0) AddInto(static_cast<float*>(w), part.data(), g.WeightsSize());
    }
    return;
  }
  auto e = Get(g, op);
  dnnl::stream stream(Engine());
  memory user_w(op == kBackwardWeights ? g.UserDiffWeights() : g.UserWeights(), Engine(), w);
  ThreadBuffers& buffers = Buffers();
  memory prim_w = e->reorder ? buffers.Memory(kWeightsSlot, e->weights) : user_w;
  memory reorder_scratchpad = buffers.Memory(kReorderScratchpadSlot, e->reorder_scratchpad);
  if (e->reorder && op != kBackwardWeights) {
    e->to_primitive.execute(stream, {{DNNL_ARG_FROM, user_w}, {DNNL_ARG_TO, prim_w},
                                     {DNNL_ARG_SCRATCHPAD, reorder_scratchpad}});
  }
  memory user_src(g.Src(), Engine(), x), user_dst(g.Dst(), Engine(), y);
  // Winograd's blocked copies of the activations, else the user's buffers themselves.
  memory src = e->blocked ? buffers.Memory(kSrcSlot, e->src) : user_src;
  memory dst = e->blocked ? buffers.Memory(kDstSlot, e->dst) : user_dst;
  memory scratchpad = buffers.Memory(kScratchpadSlot, e->scratchpad);
  if (op == kForward) {
    if (e->blocked) e->src_in.execute(stream, user_src, src);
    e->primitive.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w}, {DNNL_ARG_DST, dst},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (e->blocked) e->dst_out.execute(stream, dst, user_dst);
  } else if (op == kBackwardData) {
    if (e->blocked) e->dst_in.execute(stream, user_dst, dst);
    e->primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, src}, {DNNL_ARG_WEIGHTS, prim_w}, {DNNL_ARG_DIFF_DST, dst},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (e->blocked) e->src_out.execute(stream, src, user_src);
  } else {
    if (e->blocked) {
      e->src_in.execute(stream, user_src, src);
      e->dst_in.execute(stream, user_dst, dst);
    }
    e->primitive.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_WEIGHTS, prim_w}, {DNNL_ARG_DIFF_DST, dst},
                                  {DNNL_ARG_SCRATCHPAD, scratchpad}});
    if (e->reorder) {
      e->to_user.execute(stream, {{DNNL_ARG_FROM, prim_w}, {DNNL_ARG_TO, user_w},
                                  {DNNL_ARG_SCRATCHPAD, reorder_scratchpad}});
    }
  }
  stream.wait();
}

// All cores on one call (threads == 0): the batch is split into one slice per thread of XLA's pool, each slice
// run by a one-thread primitive on that thread (filter gradients summed), so no OpenMP team is woken or left
// spinning beside XLA's threads. Batches that do not split evenly, and a share of the cores (threads > 0: several
// devices in one process), run as one call on an OpenMP team.
int64_t Slices(const Geometry& g, ffi::ThreadPool& pool) {
  if (g.threads != 0) return 1;
  int64_t t = std::min<int64_t>(pool.num_threads(), g.n);
  return t > 1 && g.n % t == 0 ? t : 1;
}

// An OwnWinograd geometry: images in one contiguous part per thread of XLA's pool (threads == 0; else all on the
// calling thread), the kernel transformed once by the caller, the filter gradient's parts (double) summed in part
// order, so the result never depends on which thread ran which part.
void RunOwnWinograd(ffi::ThreadPool& pool, const Geometry& g, Op op, float* x, float* w, float* y) {
  namespace wg = jaxcnn::winograd;
  const int64_t parts = g.threads == 0 ? std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), g.n)) : 1;
  std::vector<int64_t> offsets(parts + 1);
  for (int64_t i = 0; i <= parts; ++i) offsets[i] = i;
  const int64_t x_image = g.h * g.w * g.cin, y_image = g.ho * g.wo * g.cout;
  auto first = [&](int64_t part) { return part * g.n / parts; };
  const int64_t values = wg::KernelValues(g.cin, g.cout);
  if (op == kBackwardWeights) {
    std::vector<double> du(parts * values, 0.0);
    jaxcnn::ParallelForGroups(pool, offsets, [&](int64_t i) {
      wg::FilterGradTransformed(x + first(i) * x_image, y + first(i) * y_image, du.data() + i * values,
                                first(i + 1) - first(i), g.h, g.w, g.cin, g.cout);
    });
    for (int64_t i = 1; i < parts; ++i) {
      for (int64_t j = 0; j < values; ++j) du[j] += du[i * values + j];
    }
    wg::FinishFilterGrad(du.data(), g.cin, g.cout, w);
    return;
  }
  std::vector<float> u(values);
  if (op == kForward) {
    wg::TransformKernel(w, g.cin, g.cout, u.data());
  } else {
    wg::TransformKernelForInputGrad(w, g.cin, g.cout, u.data());
  }
  const bool fwd = op == kForward;
  jaxcnn::ParallelForGroups(pool, offsets, [&](int64_t i) {
    const int64_t n = first(i + 1) - first(i);
    if (fwd) {
      wg::Convolve(x + first(i) * x_image, u.data(), y + first(i) * y_image, n, g.h, g.w, g.cin, g.cout);
    } else {
      wg::Convolve(y + first(i) * y_image, u.data(), x + first(i) * x_image, n, g.h, g.w, g.cout, g.cin);
    }
  });
}

ffi::Error Run(ffi::ThreadPool& pool, const Geometry& g, Op op, void* x, void* w, void* y) {
  try {
    if (g.OwnWinograd(op)) {
      RunOwnWinograd(pool, g, op, static_cast<float*>(x), static_cast<float*>(w), static_cast<float*>(y));
      return ffi::Error::Success();
    }
    const int64_t slices = Slices(g, pool);
    const int64_t w_size = g.WeightsSize();
    // The filter gradient in float32: written in place for float32, else into a buffer rounded at the end.
    std::vector<float> dw_f32(op == kBackwardWeights && g.bf16 ? w_size : 0);
    void* dw = dw_f32.empty() ? w : dw_f32.data();
    if (slices == 1) {
      jaxcnn::AllCoresGuard guard(g.threads);
      Execute(g, op, x, op == kBackwardWeights ? dw : w, y);
    } else {
      Geometry slice = g;
      slice.n = g.n / slices;
      slice.threads = 1;
      Get(slice, op);  // built once, before the threads use it
      const int64_t x_step = slice.n * g.XImageBytes(), y_step = slice.n * g.YImageBytes();
      char* xb = static_cast<char*>(x);
      char* yb = static_cast<char*>(y);
      std::vector<float> partial(op == kBackwardWeights ? (slices - 1) * w_size : 0);
      jaxcnn::ParallelFor(pool, slices, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {  // Execute sets this thread's OpenMP count to the slice's 1
          void* wi = op != kBackwardWeights ? w : i > 0 ? partial.data() + (i - 1) * w_size : dw;
          Execute(slice, op, xb + i * x_step, wi, yb + i * y_step);
        }
      }, /*per_thread=*/1);
      for (int64_t i = 1; i < slices && op == kBackwardWeights; ++i) {
        AddInto(static_cast<float*>(dw), partial.data() + (i - 1) * w_size, w_size);
      }
    }
    if (!dw_f32.empty()) {
      uint16_t* out = static_cast<uint16_t*>(w);
      for (int64_t j = 0; j < w_size; ++j) out[j] = jaxcnn::Narrow(dw_f32[j]);
    }
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxcnn oneDNN convolution failed: ") + err.what());
  }
  return ffi::Error::Success();
}

// float32 or bfloat16, the same for all three buffers (jaxcnn's Python side guarantees it).
ffi::Error CheckTypes(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, ffi::DataType out) {
  const ffi::DataType t = a.element_type();
  if ((t != ffi::DataType::F32 && t != ffi::DataType::BF16) || b.element_type() != t || out != t) {
    return ffi::Error::InvalidArgument("jaxcnn oneDNN convolution: operands and result must all be float32 or all "
                                       "bfloat16");
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Span<const int64_t> params) {
  if (auto error = CheckTypes(x, w, y->element_type()); error.failure()) return error;
  Geometry g = FromShapes(x.dimensions(), w.dimensions(), y->dimensions(), params, x.element_type());
  return Run(pool, g, kForward, x.untyped_data(), w.untyped_data(), y->untyped_data());
}

ffi::Error BackwardData(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Span<const int64_t> params) {
  if (auto error = CheckTypes(dy, w, dx->element_type()); error.failure()) return error;
  Geometry g = FromShapes(dx->dimensions(), w.dimensions(), dy.dimensions(), params, dy.element_type());
  return Run(pool, g, kBackwardData, dx->untyped_data(), w.untyped_data(), dy.untyped_data());
}

ffi::Error BackwardWeights(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           ffi::Span<const int64_t> params) {
  if (auto error = CheckTypes(x, dy, dw->element_type()); error.failure()) return error;
  Geometry g = FromShapes(x.dimensions(), dw->dimensions(), dy.dimensions(), params, x.element_type());
  return Run(pool, g, kBackwardWeights, x.untyped_data(), dw->untyped_data(), dy.untyped_data());
}

}  // namespace

#define JAXCNN_BILINEAR_BINDING                  \
  ffi::Ffi::Bind()                               \
      .Ctx<ffi::ThreadPool>()                    \
      .Arg<ffi::AnyBuffer>()                     \
      .Arg<ffi::AnyBuffer>()                     \
      .Ret<ffi::AnyBuffer>()                     \
      .Attr<ffi::Span<const int64_t>>("params")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnConvFwd, Forward, JAXCNN_BILINEAR_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnConvBwdData, BackwardData, JAXCNN_BILINEAR_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnConvBwdWeights, BackwardWeights, JAXCNN_BILINEAR_BINDING);

// dims = [n, h, w, cin, kh, kw, cout, ho, wo, stride_h, stride_w, pad_t, pad_b, pad_l, pad_r, dil_h, dil_w, groups,
//         threads, bf16]
extern "C" const char* JaxcnnConvImpl(int64_t op, const int64_t* d, char* error, int64_t error_len) {
  Geometry g{d[0],  d[1],  d[2],  d[3],  d[4],  d[5],  d[6],  d[7],  d[8], d[9],
             d[10], d[11], d[12], d[13], d[14], d[15], d[16], d[17], d[18], d[19]};
  try {
    static const char* const kOwnWinograd = "jaxcnn_winograd_f4x4_3x3";
    if (g.OwnWinograd(static_cast<Op>(op))) return kOwnWinograd;
    return Get(g, static_cast<Op>(op))->impl.c_str();  // cache entries live as long as the process
  } catch (const std::exception& err) {
    jaxcnn::CopyError(err, error, error_len);
    return nullptr;
  }
}
