// Training-mode batch normalisation (optionally fused with the ReLU after it) for XLA's CPU backend, run by
// oneDNN's JIT kernels. Built into the same library as onednn_conv.cc (jaxcnn/nn/onednn.py compiles both).
//
// Two XLA FFI handlers; activations are channels-last, [N, H, W, C] (or any rank: [..., C], normalised over all
// axes but the last):
//   JaxcnnNormFwd (x, scale [C], bias [C])
//       -> y = max?(0, (x - mean) / sqrt(var + eps) * scale + bias), mean [C], var [C] (biased), ws [bytes]
//   JaxcnnNormBwd (x, dy, mean [C], var [C], scale [C], ws [bytes])
//       -> dx, dscale [C], dbias [C]       (the gradient of the forward's y, the ReLU's mask applied from ws)
// Attributes: "epsilon" (f32), "relu" (int64: 1 = fuse the ReLU, whose mask oneDNN keeps in the workspace ws),
// "threads" (int64: OpenMP threads, 0 = all; see onednn_conv.cc). Without the ReLU ws is one unused byte.
//
// JaxcnnNormWorkspace(dims, epsilon, error, error_len) builds (and caches) the primitives for dims = [n, h, w, c,
// relu, threads] and returns the workspace's size in bytes (-1 with a message in `error`); JaxcnnNormImpl returns
// oneDNN's implementation name (jaxcnn keeps XLA's BatchNorm when it is a reference implementation).

#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

using jaxcnn::Engine;

struct NormGeometry {
  int64_t n, h, w, c, relu, threads;
  float epsilon;

  std::vector<int64_t> Key() const {
    int32_t eps_bits;
    std::memcpy(&eps_bits, &epsilon, sizeof(eps_bits));
    return {n, h, w, c, relu, threads, eps_bits};
  }
  void SetThreads() const { jaxcnn::SetThreads(threads); }
  memory::desc Data() const { return memory::desc({n, c, h, w}, dt::f32, tag::nhwc); }
  dnnl::normalization_flags Flags() const {
    auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
    return relu ? flags | dnnl::normalization_flags::fuse_norm_relu : flags;
  }
};

// x's dimensions -> (n, h, w, c): [N, H, W, C] as is, any other rank as [prod(leading), 1, 1, C].
NormGeometry FromDims(ffi::Span<const int64_t> d, float epsilon, int64_t relu, int64_t threads) {
  NormGeometry g{1, 1, 1, 1, relu, threads, epsilon};
  const size_t rank = d.size();
  g.c = rank ? d[rank - 1] : 1;
  if (rank == 4) {
    g.n = d[0], g.h = d[1], g.w = d[2];
  } else {
    for (size_t i = 0; i + 1 < rank; ++i) g.n *= d[i];
  }
  return g;
}

struct NormEntry {
  dnnl::batch_normalization_forward forward;
  dnnl::batch_normalization_backward backward;
  memory::desc forward_scratchpad, backward_scratchpad, workspace, stats, weights;
  std::string impl;
};

std::mutex cache_mutex;
std::map<std::vector<int64_t>, std::shared_ptr<NormEntry>> cache;

std::shared_ptr<NormEntry> Build(const NormGeometry& g) {
  auto e = std::make_shared<NormEntry>();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // per call: XLA may run several devices at once
  memory::desc data = g.Data();
#if DNNL_VERSION_MAJOR >= 3
  dnnl::batch_normalization_forward::primitive_desc fwd(Engine(), dnnl::prop_kind::forward_training, data, data,
                                                        g.epsilon, g.Flags(), attr);
  dnnl::batch_normalization_backward::primitive_desc bwd(Engine(), dnnl::prop_kind::backward, data, data, data,
                                                         g.epsilon, g.Flags(), fwd, attr);
#else
  dnnl::batch_normalization_forward::desc fwd_desc(dnnl::prop_kind::forward_training, data, g.epsilon, g.Flags());
  dnnl::batch_normalization_forward::primitive_desc fwd(fwd_desc, attr, Engine());
  dnnl::batch_normalization_backward::desc bwd_desc(dnnl::prop_kind::backward, data, data, g.epsilon, g.Flags());
  dnnl::batch_normalization_backward::primitive_desc bwd(bwd_desc, attr, Engine(), fwd);
#endif
  e->forward = dnnl::batch_normalization_forward(fwd);
  e->backward = dnnl::batch_normalization_backward(bwd);
  e->forward_scratchpad = fwd.scratchpad_desc();
  e->backward_scratchpad = bwd.scratchpad_desc();
  e->workspace = fwd.workspace_desc();
  e->stats = fwd.mean_desc();
  e->weights = fwd.weights_desc();
  e->impl = std::string(fwd.impl_info_str()) + "," + bwd.impl_info_str();
  return e;
}

std::shared_ptr<NormEntry> Get(const NormGeometry& g) {
  g.SetThreads();
  auto key = g.Key();
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto e = Build(g);
  cache.emplace(std::move(key), e);
  return e;
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                   ffi::ResultBuffer<ffi::U8> ws, float epsilon, int64_t relu, int64_t threads) {
  try {
    NormGeometry g = FromDims(x.dimensions(), epsilon, relu, threads);
    auto e = Get(g);
    jaxcnn::AllCoresGuard guard(g.threads);
    dnnl::stream stream(Engine());
    memory::desc data = g.Data();
    memory src(data, Engine(), x.typed_data()), dst(data, Engine(), y->typed_data());
    memory m(e->stats, Engine(), mean->typed_data()), v(e->stats, Engine(), var->typed_data());
    memory s(e->weights, Engine(), scale.typed_data()), b(e->weights, Engine(), bias.typed_data());
    memory scratchpad(e->forward_scratchpad, Engine());
    std::unordered_map<int, memory> args{{DNNL_ARG_SRC, src},   {DNNL_ARG_DST, dst},        {DNNL_ARG_MEAN, m},
                                         {DNNL_ARG_VARIANCE, v}, {DNNL_ARG_SCALE, s},       {DNNL_ARG_SHIFT, b},
                                         {DNNL_ARG_SCRATCHPAD, scratchpad}};
    if (relu) args.insert({DNNL_ARG_WORKSPACE, memory(e->workspace, Engine(), ws->typed_data())});
    e->forward.execute(stream, args);
    stream.wait();
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("jaxcnn oneDNN batch norm failed: ") + err.what());
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> mean,
                    ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::U8> ws,
                    ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                    ffi::ResultBuffer<ffi::F32> dbias, float epsilon, int64_t relu, int64_t threads) {
  try {
    NormGeometry g = FromDims(x.dimensions(), epsilon, relu, threads);
    auto e = Get(g);
    jaxcnn::AllCoresGuard guard(g.threads);
    dnnl::stream stream(Engine());
    memory::desc data = g.Data();
    memory src(data, Engine(), x.typed_data()), diff_dst(data, Engine(), dy.typed_data());
    memory diff_src(data, Engine(), dx->typed_data());
    memory m(e->stats, Engine(), mean.typed_data()), v(e->stats, Engine(), var.typed_data());
    memory s(e->weights, Engine(), scale.typed_data());
    memory ds(e->weights, Engine(), dscale->typed_data()), db(e->weights, Engine(), dbias->typed_data());
    // oneDNN 2.x reads the shift when use_shift is set even though the backward pass does not need it.
    memory shift(e->weights, Engine());
    memory scratchpad(e->backward_scratchpad, Engine());
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, src},        {DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_MEAN, m},
        {DNNL_ARG_VARIANCE, v},     {DNNL_ARG_SCALE, s},           {DNNL_ARG_SHIFT, shift},
        {DNNL_ARG_DIFF_SRC, diff_src}, {DNNL_ARG_DIFF_SCALE, ds},  {DNNL_ARG_DIFF_SHIFT, db},
        {DNNL_ARG_SCRATCHPAD, scratchpad}};
    if (relu) args.insert({DNNL_ARG_WORKSPACE, memory(e->workspace, Engine(), const_cast<uint8_t*>(ws.typed_data()))});
    e->backward.execute(stream, args);
    stream.wait();
  } catch (const std::exception& err) {
    return ffi::Error(ffi::ErrorCode::kInternal,
                      std::string("jaxcnn oneDNN batch norm backward failed: ") + err.what());
  }
  return ffi::Error::Success();
}

NormGeometry FromQuery(const int64_t* d, float epsilon) {
  return NormGeometry{d[0], d[1], d[2], d[3], d[4], d[5], epsilon};
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnNormFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxcnnNormBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Attr<int64_t>("relu")
                                  .Attr<int64_t>("threads"));

// dims = [n, h, w, c, relu, threads].
extern "C" int64_t JaxcnnNormWorkspace(const int64_t* d, float epsilon, char* error, int64_t error_len) {
  try {
    return static_cast<int64_t>(Get(FromQuery(d, epsilon))->workspace.get_size());
  } catch (const std::exception& err) {
    jaxcnn::CopyError(err, error, error_len);
    return -1;
  }
}

extern "C" const char* JaxcnnNormImpl(const int64_t* d, float epsilon) {
  try {
    return Get(FromQuery(d, epsilon))->impl.c_str();
  } catch (const std::exception&) {
    return nullptr;
  }
}
