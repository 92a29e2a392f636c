// XLA FFI handlers of the CPU kernels (cpu_kernel.h): the operator's local part (the all-reduce
// stays an XLA psum on CPU) and the dequantize-only kernel used for large m.
#include "cpu_handler.h"

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "cpu_kernel.h"
#include "wqmm_attrs.h"

namespace ffi = xla::ffi;

namespace jax_wqmm {
namespace {

ffi::ErrorOr<cpu::Float> FloatType(ffi::AnyBuffer b, const char* what) {
  switch (b.element_type()) {
    case ffi::DataType::BF16: return cpu::Float::kBF16;
    case ffi::DataType::F16: return cpu::Float::kF16;
    case ffi::DataType::F32: return cpu::Float::kF32;
    default:
      return ffi::Unexpected(ffi::Error::InvalidArgument(std::string(what) + ": unsupported dtype"));
  }
}

// The weight-side fields of a problem: x2 (int8 / packed int4), scale, optional offset.
ffi::Error FillWeight(cpu::Problem& p, ffi::AnyBuffer x2, ffi::AnyBuffer scale,
                      const ffi::AnyBuffer* offset, const Attrs& a) {
  if (a.scale_transposed) {
    return ffi::Error::InvalidArgument("antiquant_scale: the CPU kernel takes row-major scales");
  }
  auto act = FloatType(scale, "antiquant_scale");
  if (act.has_error()) return act.error();
  if (*act == cpu::Float::kF32) {  // scale has x1's dtype, which the operator limits to these
    return ffi::Error::InvalidArgument("antiquant_scale: the CPU kernel takes float16 or bfloat16");
  }
  p.act = *act;
  p.k = a.k;
  p.n = a.n;
  if (x2.element_type() == ffi::DataType::S8) p.int4 = false;
  else if (x2.element_type() == ffi::DataType::S4) p.int4 = true;
  else return ffi::Error::InvalidArgument("x2: the CPU kernel takes int8 or int4 weights");
  p.x2 = static_cast<const uint8_t*>(x2.untyped_data());
  p.transposed = a.transpose_x2;
  p.scale = scale.untyped_data();
  p.scale_count = static_cast<int64_t>(scale.element_count());
  p.group_size = a.group_size;
  p.offset = offset ? offset->untyped_data() : nullptr;
  return ffi::Error::Success();
}

// The kernels' workers on XLA's FFI thread pool (the cores XLA gives the CPU client). The
// caller drains tasks too and then waits only for tasks already running, never for one still
// queued: no deadlock when every pool thread is busy (or when there is no pool and Schedule
// runs the closure inline). A closure that starts after all tasks are claimed does nothing.
cpu::Workers PoolWorkers(ffi::ThreadPool pool) {
  const int64_t n = pool.num_threads();
  if (n <= 0) return cpu::OwnThreads();  // this runtime gives no pool
  cpu::Workers w;
  w.threads = static_cast<int>(n);
  w.run = [pool](int tasks, const std::function<void(int)>& body) mutable {
    struct Job {
      std::atomic<int> next{0}, done{0};
      int tasks;
      const std::function<void(int)>* body;
    };
    auto job = std::make_shared<Job>();
    job->tasks = tasks;
    job->body = &body;
    auto drain = [](Job& j) {
      for (int t; (t = j.next.fetch_add(1)) < j.tasks;) {
        (*j.body)(t);
        j.done.fetch_add(1, std::memory_order_release);
      }
    };
    for (int t = 1; t < tasks; ++t) pool.Schedule([job, drain] { drain(*job); });
    drain(*job);
    while (job->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
  };
  return w;
}

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::AnyBuffer scale,
                      ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> out, WQMM_ATTR_PARAMS) {
  const Attrs a = WQMM_ATTRS;
  auto optional = OptionalOperands(rest, {a.has_offset, a.has_bias, a.has_x3});
  if (optional.has_error()) return optional.error();
  const auto& [offset, bias, x3] = *optional;
  cpu::Problem p;
  if (auto e = FillWeight(p, x2, scale, offset ? &*offset : nullptr, a); e.failure()) return e;
  p.x1 = x1.untyped_data();
  p.m = static_cast<int64_t>(x1.element_count()) / a.k;
  if (bias) {
    auto t = FloatType(*bias, "bias");
    if (t.has_error()) return t.error();
    p.bias = bias->untyped_data();
    p.bias_dtype = *t;
  }
  if (x3) {
    auto t = FloatType(*x3, "x3");
    if (t.has_error()) return t.error();
    p.x3 = x3->untyped_data();
    p.x3_dtype = *t;
  }
  p.out = out->untyped_data();
  cpu::Matmul(p, PoolWorkers(pool));
  return ffi::Error::Success();
}

ffi::Error DequantizeImpl(ffi::ThreadPool pool, ffi::AnyBuffer x2, ffi::AnyBuffer scale, ffi::RemainingArgs rest,
                          ffi::Result<ffi::AnyBuffer> out, WQMM_ATTR_PARAMS, int64_t col_begin,
                          int64_t col_end) {
  const Attrs a = WQMM_ATTRS;
  // Only the offset follows x2 and scale here (the flags still say whether bias / x3 exist).
  auto optional = OptionalOperands(rest, {a.has_offset, false, false});
  if (optional.has_error()) return optional.error();
  const std::optional<ffi::AnyBuffer>& offset = (*optional)[0];
  cpu::Problem p;
  if (auto e = FillWeight(p, x2, scale, offset ? &*offset : nullptr, a); e.failure()) return e;
  if (col_begin < 0 || col_end > a.n || col_begin >= col_end) {
    return ffi::Error::InvalidArgument("dequantize: bad column range");
  }
  p.col_begin = col_begin;
  p.col_end = col_end;
  p.out = out->untyped_data();
  cpu::Dequantize(p, PoolWorkers(pool));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_wqmm

XLA_FFI_DEFINE_HANDLER_SYMBOL(WqmmCpuMatmul, jax_wqmm::MatmulImpl,
                              WQMM_BIND_OPERANDS(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WqmmCpuDequantize, jax_wqmm::DequantizeImpl,
                              WQMM_BIND_ATTRS(ffi::Ffi::Bind()
                                                  .Ctx<ffi::ThreadPool>()
                                                  .Arg<ffi::AnyBuffer>()
                                                  .Arg<ffi::AnyBuffer>()
                                                  .RemainingArgs()
                                                  .Ret<ffi::AnyBuffer>())
                                  .Attr<int64_t>("col_begin")
                                  .Attr<int64_t>("col_end"));
