// The XLA FFI handler: decodes the validated call (attributes from jax_wqmm.spec.WqmmSpec),
// builds aclTensor descriptors, and runs aclnnWeightQuantMatmulAllReduce's two stages.
#include "wqmm_handler.h"

#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string_view>
#include <vector>

#include "cann_library.h"
#include "wqmm_attrs.h"

namespace ffi = xla::ffi;

namespace jax_wqmm {

// ------------------------------------------------------------------------- group registry

namespace {
std::mutex g_groups_mu;
std::map<std::pair<std::string, int32_t>, std::string>& GroupTable() {
  static auto* t = new std::map<std::pair<std::string, int32_t>, std::string>();
  return *t;
}
}  // namespace

void RegisterGroup(const std::string& axis, int32_t device, const std::string& name) {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  GroupTable()[{axis, device}] = name;
}

void ClearGroups() {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  GroupTable().clear();
}

std::map<std::pair<std::string, int32_t>, std::string> Groups() {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  return GroupTable();
}

namespace {

std::optional<std::string> LookupGroup(std::string_view axis, int32_t device) {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  auto it = GroupTable().find({std::string(axis), device});
  if (it == GroupTable().end()) return std::nullopt;
  return it->second;
}

// ------------------------------------------------------------------------- descriptors

// Owns one aclTensor; destroys it on every path.
class Tensor {
 public:
  Tensor() = default;
  Tensor(const CannApi* api, aclTensor* t) : api_(api), t_(t) {}
  Tensor(Tensor&& o) noexcept : api_(o.api_), t_(o.t_) { o.t_ = nullptr; }
  Tensor& operator=(Tensor&& o) noexcept {
    reset();
    api_ = o.api_;
    t_ = o.t_;
    o.t_ = nullptr;
    return *this;
  }
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  ~Tensor() { reset(); }
  aclTensor* get() const { return t_; }

 private:
  void reset() {
    if (t_ != nullptr) api_->aclDestroyTensor(t_);
    t_ = nullptr;
  }
  const CannApi* api_ = nullptr;
  aclTensor* t_ = nullptr;
};

std::optional<aclDataType> AclDataType(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F16: return ACL_FLOAT16;
    case ffi::DataType::BF16: return ACL_BF16;
    case ffi::DataType::F32: return ACL_FLOAT;
    case ffi::DataType::S8: return ACL_INT8;
    case ffi::DataType::S4: return ACL_INT4;
    case ffi::DataType::U8: return ACL_UINT8;
    case ffi::DataType::F8E5M2: return ACL_FLOAT8_E5M2;
    case ffi::DataType::F8E4M3FN: return ACL_FLOAT8_E4M3FN;
    default: return std::nullopt;
  }
}

std::vector<int64_t> ContiguousStrides(const std::vector<int64_t>& dims) {
  std::vector<int64_t> s(dims.size(), 1);
  for (int i = static_cast<int>(dims.size()) - 2; i >= 0; --i) s[i] = s[i + 1] * dims[i + 1];
  return s;
}

struct Descriptor {
  std::vector<int64_t> view, strides, storage;
  aclDataType dtype;
  aclFormat format = ACL_FORMAT_ND;
};

ffi::ErrorOr<Tensor> Create(const CannApi& api, const Descriptor& d, void* data,
                            const char* what) {
  aclTensor* t = api.aclCreateTensor(d.view.data(), d.view.size(), d.dtype, d.strides.data(), 0,
                                     d.format, d.storage.data(), d.storage.size(), data);
  if (t == nullptr) {
    return ffi::Unexpected(ffi::Error::Internal(std::string("aclCreateTensor failed for ") + what +
                                                ": " + api.RecentErrorMessage()));
  }
  return Tensor(&api, t);
}

// A buffer in its own dtype, ND. ``column_major``: a 2-D buffer whose layout XLA made
// column-major (the (G, n) view over (n, G) storage, strides (1, G)); else row-major.
ffi::ErrorOr<Descriptor> Plain(ffi::AnyBuffer b, const char* what, bool column_major = false) {
  auto dt = AclDataType(b.element_type());
  if (!dt) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(std::string(what) + ": unsupported dtype"));
  }
  Descriptor d;
  auto dims = b.dimensions();
  d.view.assign(dims.begin(), dims.end());
  d.dtype = *dt;
  if (column_major) {
    if (d.view.size() != 2) {
      return ffi::Unexpected(ffi::Error::InvalidArgument(std::string(what) + ": a column-major operand must be 2-D"));
    }
    d.strides = {1, d.view[0]};
    d.storage = {d.view[1], d.view[0]};
    return d;
  }
  d.strides = ContiguousStrides(d.view);
  d.storage = d.view;
  return d;
}

std::string StatusName(aclnnStatus s) {
  switch (s) {
    case ACLNN_ERR_PARAM_NULLPTR: return "ACLNN_ERR_PARAM_NULLPTR";
    case ACLNN_ERR_PARAM_INVALID: return "ACLNN_ERR_PARAM_INVALID";
    case ACLNN_ERR_INNER: return "ACLNN_ERR_INNER";
    case ACLNN_ERR_INNER_TILING_ERROR: return "ACLNN_ERR_INNER_TILING_ERROR";
    case ACLNN_ERR_INNER_NULLPTR: return "ACLNN_ERR_INNER_NULLPTR";
    default: return "aclnnStatus";
  }
}

ffi::Error StageError(const CannApi& api, const char* stage, aclnnStatus status) {
  std::ostringstream msg;
  msg << stage << " returned " << status << " (" << StatusName(status) << ")";
  std::string detail = api.RecentErrorMessage();
  if (!detail.empty()) msg << ": " << detail;
  return ffi::Error::Internal(msg.str());
}

// Allocates the workspace; returns null with an error on failure.
using WorkspaceFn = void* (*)(void* ctx, uint64_t bytes);

// lib: the caller's load of the CANN libraries (null: none), held for the whole call so that
// a reload meanwhile cannot unload what this call uses.
ffi::Error Run(const LoadedCann* lib, void* stream, WorkspaceFn workspace, void* workspace_ctx,
               int32_t device, ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::AnyBuffer scale,
               ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> out, const Attrs& a) {
  if (lib == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "jax_wqmm: the CANN libraries are not loaded:\n" + CannLibrary::Get().report());
  }
  const CannApi* api = &lib->api;
  // HCCL resolves the group name in the table of the calling thread's current device, and
  // aclnn runs on it: make the buffers' device current (never aclInit: the plugin owns it).
  if (std::string e = api->EnsureDevice(device); !e.empty()) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition, "jax_wqmm: " + e);
  }
  auto group = LookupGroup(a.axis, device);
  if (!group) {
    return ffi::Error::InvalidArgument(
        "jax_wqmm: no HCCL group registered for mesh axis '" + std::string(a.axis) +
        "' on local device " + std::to_string(device) +
        ": call jax_wqmm.hccl.create_groups(mesh, axis) or jax_wqmm.hccl.register_group(...)");
  }
  size_t expected = static_cast<size_t>(a.has_offset) + a.has_bias + a.has_x3;
  if (rest.size() != expected) {
    return ffi::Error::InvalidArgument("jax_wqmm: operand count does not match the flags");
  }

  // x1, scale, offset, bias, x3, out: contiguous ND in their own dtype.
  auto d_x1 = Plain(x1, "x1");
  if (d_x1.has_error()) return d_x1.error();
  auto d_scale = Plain(scale, "antiquant_scale", a.scale_transposed);
  if (d_scale.has_error()) return d_scale.error();
  auto d_out = Plain(*out, "output");
  if (d_out.has_error()) return d_out.error();

  // x2: a (k, n) view; transposed storage (n, k) has strides (1, k); NZ keeps its 4-D storage.
  Descriptor d_x2;
  d_x2.dtype = static_cast<aclDataType>(a.x2_dtype);
  d_x2.format = static_cast<aclFormat>(a.x2_format);
  d_x2.view = {a.k, a.n};
  d_x2.strides = a.transpose_x2 ? std::vector<int64_t>{1, a.k} : std::vector<int64_t>{a.n, 1};
  auto x2_dims = x2.dimensions();
  d_x2.storage.assign(x2_dims.begin(), x2_dims.end());

  auto t_x1 = Create(*api, *d_x1, x1.untyped_data(), "x1");
  if (t_x1.has_error()) return t_x1.error();
  auto t_x2 = Create(*api, d_x2, x2.untyped_data(), "x2");
  if (t_x2.has_error()) return t_x2.error();
  auto t_scale = Create(*api, *d_scale, scale.untyped_data(), "antiquant_scale");
  if (t_scale.has_error()) return t_scale.error();

  auto optional = OptionalOperands(rest, {a.has_offset, a.has_bias, a.has_x3});
  if (optional.has_error()) return optional.error();
  Tensor t_offset, t_bias, t_x3;
  const char* names[3] = {"antiquant_offset", "bias", "x3"};
  Tensor* slots[3] = {&t_offset, &t_bias, &t_x3};
  for (int j = 0; j < 3; ++j) {
    const std::optional<ffi::AnyBuffer>& b = (*optional)[j];
    if (!b) continue;
    auto d = Plain(*b, names[j], j == 0 && a.scale_transposed);
    if (d.has_error()) return d.error();
    auto t = Create(*api, *d, b->untyped_data(), names[j]);
    if (t.has_error()) return t.error();
    *slots[j] = std::move(*t);
  }
  auto t_out = Create(*api, *d_out, out->untyped_data(), "output");
  if (t_out.has_error()) return t_out.error();

  std::string reduce_op(a.reduce_op);
  uint64_t ws_size = 0;
  aclOpExecutor* executor = nullptr;
  aclnnStatus st = api->GetWorkspaceSize(
      t_x1->get(), t_x2->get(), t_bias.get(), t_scale->get(), t_offset.get(), t_x3.get(),
      group->c_str(), reduce_op.c_str(), a.comm_turn, a.stream_mode, a.group_size, t_out->get(),
      &ws_size, &executor);
  if (st != ACLNN_SUCCESS) {
    return StageError(*api, "aclnnWeightQuantMatmulAllReduceGetWorkspaceSize", st);
  }
  void* ws = nullptr;
  if (ws_size > 0) {
    ws = workspace(workspace_ctx, ws_size);
    if (ws == nullptr) {
      return ffi::Error(ffi::ErrorCode::kResourceExhausted, "jax_wqmm: could not allocate a workspace of " +
                                           std::to_string(ws_size) + " bytes");
    }
  }
  st = api->Run(ws, ws_size, executor, stream);
  if (st != ACLNN_SUCCESS) return StageError(*api, "aclnnWeightQuantMatmulAllReduce", st);
  return ffi::Error::Success();
}

void* DeviceWorkspace(void* ctx, uint64_t bytes) {
  auto r = static_cast<ffi::ScratchAllocator*>(ctx)->Allocate(bytes, 512);
  return r.has_value() ? *r : nullptr;
}

void* HostWorkspace(void* ctx, uint64_t bytes) {
  auto* v = static_cast<std::vector<uint8_t>*>(ctx);
  v->resize(bytes);
  return v->data();
}

ffi::Error DeviceImpl(void* stream, ffi::ScratchAllocator scratch, int32_t device,
                      ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::AnyBuffer scale,
                      ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> out, WQMM_ATTR_PARAMS) {
  const std::shared_ptr<const LoadedCann> lib = CannLibrary::Get().Current();
  return Run(lib.get(), stream, DeviceWorkspace, &scratch, device, x1, x2, scale, rest, out, WQMM_ATTRS);
}

ffi::Error HostImpl(int32_t device, ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::AnyBuffer scale,
                    ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> out, WQMM_ATTR_PARAMS) {
  const std::shared_ptr<const LoadedCann> lib = CannLibrary::Get().Current();
  std::vector<uint8_t> workspace;
  return Run(lib.get(), nullptr, HostWorkspace, &workspace, device, x1, x2, scale, rest, out, WQMM_ATTRS);
}

ffi::Error NoopImpl(int32_t, ffi::AnyBuffer, ffi::AnyBuffer, ffi::AnyBuffer, ffi::RemainingArgs,
                    ffi::Result<ffi::AnyBuffer>, WQMM_ATTR_PARAMS) {
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_wqmm

XLA_FFI_DEFINE_HANDLER_SYMBOL(WqmmAclnnDevice, jax_wqmm::DeviceImpl,
                              WQMM_BIND_OPERANDS(ffi::Ffi::Bind()
                                                     .Ctx<ffi::PlatformStream<void*>>()
                                                     .Ctx<ffi::ScratchAllocator>()
                                                     .Ctx<ffi::DeviceOrdinal>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WqmmAclnnHost, jax_wqmm::HostImpl,
                              WQMM_BIND_OPERANDS(ffi::Ffi::Bind().Ctx<ffi::DeviceOrdinal>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(WqmmNoop, jax_wqmm::NoopImpl,
                              WQMM_BIND_OPERANDS(ffi::Ffi::Bind().Ctx<ffi::DeviceOrdinal>()));
