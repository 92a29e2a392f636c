// A host-side emulation of the CANN ABI subset that jax_wqmm calls (cann_abi.h), for tests and
// for users without Ascend hardware. It is NOT CANN: it computes the operator on host memory
// with plain loops, runs a real all-reduce across the ranks of a group (a rendezvous of the
// calling threads with a timeout), and counts live descriptors so that leaks are visible.
//
// Its argument checks are ported, as facts, from CANN's own op_api and tiling of the operator
// (ops-transformer mc2/matmul_all_reduce: op_api/aclnn_weight_quant_matmul_all_reduce.cpp
// CheckParams; op_host/op_tiling arch22 (Atlas A2) and arch35 (Ascend 950)), product by
// product for an emulated SoC that tests set (wqmm_emu_set_soc; aclrtGetSocName reports it):
//   - first stage (op_api CheckParams): 161001 for a null x1 / x2 / antiquantScale / output,
//     161002 for every dtype, attribute, shape, contiguity and transposition rule;
//   - the tiling it runs (aclnnInner...GetWorkspaceSize): 561002 (ACLNN_ERR_INNER_TILING_ERROR;
//     the exact code CANN maps a tiling failure to is not confirmed) for world size, commTurn,
//     ranges, empty tensors and the per-product quantization rules.
//
// Devices: the current device is per thread (aclrtSetDevice / aclrtGetDevice). As in HCCL, a
// group name resolves only on a thread whose current device is a member of the group, and
// HcclGetRootInfo / HcclCommInitRootInfo need a current device.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "../cann_abi.h"
#include "../numerics.h"
#include "hub.h"

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

struct aclTensor {
  std::vector<int64_t> view, strides, storage;
  aclDataType dtype;
  aclFormat format;
  void* data;
};

namespace {


std::atomic<int64_t> g_live_tensors{0};
std::atomic<int64_t> g_live_executors{0};
std::atomic<int64_t> g_calls{0};
std::atomic<int> g_fail_stage{0};
std::atomic<int> g_fail_code{0};
std::atomic<int64_t> g_timeout_ms{30000};
thread_local std::string t_error;
thread_local std::string t_error_out;
thread_local int32_t t_device = -1;

// The emulated SoC (aclrtGetSocName) and the product rules it selects.
enum class Product { kAtlasA2, kAscend950, kAtlasA3, k310P, kUnknown };
std::mutex g_soc_mu;
std::string g_soc = "Ascend910B4";

Product CurrentProduct() {
  std::lock_guard<std::mutex> lock(g_soc_mu);
  const std::string& s = g_soc;
  if (s.rfind("Ascend910B", 0) == 0) return Product::kAtlasA2;
  if (s.rfind("Ascend950", 0) == 0) return Product::kAscend950;
  if (s.rfind("Ascend910_93", 0) == 0) return Product::kAtlasA3;
  if (s.rfind("Ascend310P", 0) == 0) return Product::k310P;
  return Product::kUnknown;
}

aclnnStatus Fail(aclnnStatus code, const std::string& msg) {
  t_error = msg;
  return code;
}

// ------------------------------------------------------------------ number formats

using jax_wqmm::Bf16ToF32;
using jax_wqmm::F16ToF32;
using jax_wqmm::F32ToBf16;
using jax_wqmm::F32ToF16;

float Fp8E4M3FN(uint8_t c) {
  int s = c >> 7, e = (c >> 3) & 0xf, m = c & 7;
  if (e == 15 && m == 7) return NAN;
  float v = e == 0 ? std::ldexp(m / 8.0f, -6) : std::ldexp(1.0f + m / 8.0f, e - 7);
  return s ? -v : v;
}

float HiFloat8(uint8_t c) {
  float sign = (c & 0x80) ? -1.0f : 1.0f;
  int r = c & 0x7f;
  if (r == 0) return (c & 0x80) ? NAN : 0.0f;
  if (r == 0x6f) return sign * INFINITY;
  struct Field { int prefix, plen, d, w; };
  const Field fields[] = {{3, 2, 4, 1}, {2, 2, 3, 2}, {1, 2, 2, 3}, {1, 3, 1, 3}, {1, 4, 0, 3}};
  for (const Field& f : fields) {
    if ((r >> (7 - f.plen)) != f.prefix) continue;
    int body = r & ((1 << (7 - f.plen)) - 1);
    int exp_bits = body >> f.w, man = body & ((1 << f.w) - 1);
    int e = 0;
    if (f.d > 0) {
      int mag = (1 << (f.d - 1)) + (exp_bits & ((1 << (f.d - 1)) - 1));
      e = (exp_bits >> (f.d - 1)) ? -mag : mag;
    }
    return sign * std::ldexp(1.0f + static_cast<float>(man) / (1 << f.w), e);
  }
  return sign * std::ldexp(1.0f, (r & 7) - 23);  // prefix 0000: denormal
}

// Element ``i`` of the tensor's storage (its view's strides applied by the caller).
float ReadFloat(const aclTensor* t, int64_t i) {
  switch (t->dtype) {
    case ACL_FLOAT16: return F16ToF32(static_cast<const uint16_t*>(t->data)[i]);
    case ACL_BF16: return Bf16ToF32(static_cast<const uint16_t*>(t->data)[i]);
    case ACL_FLOAT: return static_cast<const float*>(t->data)[i];
    default: return NAN;
  }
}

float ReadWeight(const aclTensor* t, int64_t i) {
  const uint8_t* p = static_cast<const uint8_t*>(t->data);
  switch (t->dtype) {
    case ACL_INT8: return static_cast<int8_t>(p[i]);
    case ACL_INT4: {  // two per byte, element 2j in the low nibble
      int v = (p[i / 2] >> ((i % 2) * 4)) & 0xf;
      return static_cast<float>(v >= 8 ? v - 16 : v);
    }
    case ACL_FLOAT8_E4M3FN: return Fp8E4M3FN(p[i]);
    case ACL_HIFLOAT8: return HiFloat8(p[i]);
    default: return NAN;
  }
}

void WriteFloat(aclTensor* t, int64_t i, float v) {
  switch (t->dtype) {
    case ACL_FLOAT16: static_cast<uint16_t*>(t->data)[i] = F32ToF16(v); break;
    case ACL_BF16: static_cast<uint16_t*>(t->data)[i] = F32ToBf16(v); break;
    case ACL_FLOAT: static_cast<float*>(t->data)[i] = v; break;
    default: break;
  }
}

int64_t Numel(const std::vector<int64_t>& d) {
  int64_t n = 1;
  for (int64_t x : d) n *= x;
  return n;
}

std::string Dims(const std::vector<int64_t>& d) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < d.size(); ++i) s << (i ? ", " : "") << d[i];
  s << (d.size() == 1 ? ",)" : ")");
  return s.str();
}

bool IsAct(aclDataType t) { return t == ACL_FLOAT16 || t == ACL_BF16; }

// ------------------------------------------------------------------ HCCL groups

struct Group {
  std::string name;
  int size = 0;
  std::map<int32_t, int> device_to_rank;
  std::mutex mu;
  std::condition_variable cv;
  uint64_t generation = 0;
  int arrived = 0;
  std::vector<std::vector<float>> contributions;
  std::vector<bool> present;
  std::shared_ptr<std::vector<float>> result;
  std::string result_error;
  // Groups made from root info: each local rank's connection to the group's hub (hub.h),
  // which runs the all-reduce across processes.
  bool hub = false;
  std::map<int, std::shared_ptr<jax_wqmm::emu::HubRank>> hub_ranks;
};

std::mutex g_groups_mu;
std::map<std::string, std::shared_ptr<Group>>& Groups() {
  static auto* g = new std::map<std::string, std::shared_ptr<Group>>();
  return *g;
}
std::atomic<int64_t> g_group_counter{0};

std::shared_ptr<Group> GetOrCreateGroup(const std::string& name, int size) {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  auto& g = Groups()[name];
  if (!g) {
    g = std::make_shared<Group>();
    g->name = name;
    g->size = size;
    g->contributions.resize(size);
    g->present.assign(size, false);
  }
  return g;
}

std::shared_ptr<Group> FindGroup(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_groups_mu);
  auto it = Groups().find(name);
  return it == Groups().end() ? nullptr : it->second;
}

std::atomic<int64_t> g_live_comms{0};

struct Comm {  // ranks come from the group's device_to_rank
  std::shared_ptr<Group> group;
  int rank = -1;
  Comm(std::shared_ptr<Group> g, int r) : group(std::move(g)), rank(r) { g_live_comms.fetch_add(1); }
  ~Comm() { g_live_comms.fetch_sub(1); }
};

// Sums ``local`` over the group's ranks; every rank gets the rounded sum.
aclnnStatus AllReduce(Group& g, int rank, aclDataType out_dtype, std::vector<float>* data) {
  if (g.hub) {  // across processes, through the group's hub
    std::shared_ptr<jax_wqmm::emu::HubRank> link;
    {
      std::lock_guard<std::mutex> lock(g.mu);
      auto it = g.hub_ranks.find(rank);
      if (it != g.hub_ranks.end()) link = it->second;
    }
    if (!link) return Fail(ACLNN_ERR_INNER, "all-reduce on group " + g.name + ": rank " + std::to_string(rank) + " has no communicator here");
    std::string err = link->AllReduce(out_dtype, data, g_timeout_ms.load());
    return err.empty() ? ACLNN_SUCCESS : Fail(ACLNN_ERR_INNER, err + " (on rank " + std::to_string(rank) + ")");
  }
  std::unique_lock<std::mutex> lock(g.mu);
  uint64_t my_gen = g.generation;
  if (g.present[rank]) {
    return Fail(ACLNN_ERR_INNER, "all-reduce on group " + g.name + ": rank " +
                                     std::to_string(rank) + " entered twice");
  }
  g.contributions[rank] = *data;
  g.present[rank] = true;
  if (++g.arrived == g.size) {
    auto sum = std::make_shared<std::vector<float>>();
    g.result_error.clear();
    if (!jax_wqmm::emu::SumRanks(g.contributions, out_dtype, sum.get())) {
      g.result_error = "all-reduce on group " + g.name + ": ranks disagree on the element count";
    }
    g.result = sum;
    g.arrived = 0;
    std::fill(g.present.begin(), g.present.end(), false);
    ++g.generation;
    g.cv.notify_all();
  } else {
    auto timeout = std::chrono::milliseconds(g_timeout_ms.load());
    if (!g.cv.wait_for(lock, timeout, [&] { return g.generation != my_gen; })) {
      std::ostringstream missing;
      for (int r = 0; r < g.size; ++r) {
        if (!g.present[r]) missing << " " << r;
      }
      g.present[rank] = false;
      --g.arrived;
      return Fail(ACLNN_ERR_INNER, "all-reduce on group " + g.name + " timed out after " +
                                       std::to_string(timeout.count()) + " ms on rank " +
                                       std::to_string(rank) + "; ranks that never arrived:" +
                                       missing.str());
    }
  }
  if (!g.result_error.empty()) return Fail(ACLNN_ERR_INNER, g.result_error);
  *data = *g.result;
  return ACLNN_SUCCESS;
}

}  // namespace

// ------------------------------------------------------------------ the executor

struct aclOpExecutor {
  aclTensor x1, x2, scale, out;
  bool has_bias = false, has_offset = false, has_x3 = false;
  aclTensor bias, offset, x3;
  std::string group;
  int64_t group_size = 0;
  uint64_t workspace = 0;
};

// ------------------------------------------------------------------ exported ABI

EMU_EXPORT aclTensor* aclCreateTensor(const int64_t* viewDims, uint64_t viewDimsNum,
                                      aclDataType dataType, const int64_t* stride, int64_t offset,
                                      aclFormat format, const int64_t* storageDims,
                                      uint64_t storageDimsNum, void* tensorData) {
  if ((viewDimsNum && !viewDims) || (viewDimsNum && !stride) || offset != 0) {
    t_error = "aclCreateTensor: bad arguments";
    return nullptr;
  }
  auto* t = new aclTensor;
  t->view.assign(viewDims, viewDims + viewDimsNum);
  t->strides.assign(stride, stride + viewDimsNum);
  t->storage.assign(storageDims, storageDims + storageDimsNum);
  t->dtype = dataType;
  t->format = format;
  t->data = tensorData;
  g_live_tensors.fetch_add(1);
  return t;
}

EMU_EXPORT aclnnStatus aclDestroyTensor(const aclTensor* tensor) {
  if (tensor == nullptr) return Fail(ACLNN_ERR_PARAM_NULLPTR, "aclDestroyTensor: nullptr");
  delete tensor;
  g_live_tensors.fetch_sub(1);
  return ACLNN_SUCCESS;
}

EMU_EXPORT const char* aclGetRecentErrMsg() {
  t_error_out = t_error;
  t_error.clear();
  return t_error_out.empty() ? nullptr : t_error_out.c_str();
}

EMU_EXPORT aclError aclrtSetDevice(int32_t deviceId) {
  if (deviceId < 0) return 107001;  // ACL_ERROR_INVALID_PARAM
  t_device = deviceId;
  return 0;
}

EMU_EXPORT aclError aclrtGetDevice(int32_t* deviceId) {
  if (deviceId == nullptr) return 107001;
  if (t_device < 0) return 107002;  // ACL_ERROR_RT_CONTEXT_NULL: no device set on this thread
  *deviceId = t_device;
  return 0;
}

EMU_EXPORT const char* aclrtGetSocName() {
  static thread_local std::string copy;
  std::lock_guard<std::mutex> lock(g_soc_mu);
  copy = g_soc;
  return copy.c_str();
}

EMU_EXPORT HcclResult HcclCommInitAll(uint32_t ndev, int32_t* devices, HcclComm* comms) {
  if (ndev == 0 || devices == nullptr || comms == nullptr) return 1;  // HCCL_E_PARA
  std::string name = "emu_hccl_all_" + std::to_string(g_group_counter.fetch_add(1));
  auto g = GetOrCreateGroup(name, static_cast<int>(ndev));
  std::lock_guard<std::mutex> lock(g->mu);
  for (uint32_t i = 0; i < ndev; ++i) {
    g->device_to_rank[devices[i]] = static_cast<int>(i);
    comms[i] = new Comm(g, static_cast<int>(i));
  }
  return HCCL_SUCCESS;
}

EMU_EXPORT HcclResult HcclGetRootInfo(HcclRootInfo* rootInfo) {
  if (rootInfo == nullptr) return 1;
  if (t_device < 0) {
    t_error = "HcclGetRootInfo: no current device (call aclrtSetDevice first)";
    return 1;
  }
  std::memset(rootInfo->internal, 0, sizeof(rootInfo->internal));
  std::string err;
  std::string id = jax_wqmm::emu::StartHub(g_timeout_ms.load(), &err);
  if (id.empty()) {
    t_error = err;
    return 1;
  }
  std::memcpy(rootInfo->internal, id.data(), id.size());
  return HCCL_SUCCESS;
}

EMU_EXPORT HcclResult HcclCommInitRootInfo(uint32_t nRanks, const HcclRootInfo* rootInfo,
                                           uint32_t rank, HcclComm* comm) {
  if (rootInfo == nullptr || comm == nullptr || rank >= nRanks) return 1;
  if (t_device < 0) {
    t_error = "HcclCommInitRootInfo: no current device (call aclrtSetDevice first)";
    return 1;
  }
  std::string id(rootInfo->internal, strnlen(rootInfo->internal, sizeof(rootInfo->internal)));
  if (!jax_wqmm::emu::IsHubId(id)) {
    t_error = "HcclCommInitRootInfo: root info '" + id + "' was not made by HcclGetRootInfo";
    return 1;
  }
  // Like HCCL, block until every rank (in any process) has joined.
  std::string err;
  std::shared_ptr<jax_wqmm::emu::HubRank> link =
      jax_wqmm::emu::HubRank::Join(id, static_cast<int>(rank), static_cast<int>(nRanks), g_timeout_ms.load(), &err);
  if (!link) {
    t_error = err;
    return 9;  // HCCL_E_TIMEOUT
  }
  auto g = GetOrCreateGroup("emu_hccl_" + id, static_cast<int>(nRanks));
  std::lock_guard<std::mutex> lock(g->mu);
  g->hub = true;
  g->device_to_rank[t_device] = static_cast<int>(rank);
  g->hub_ranks[static_cast<int>(rank)] = link;
  *comm = new Comm(g, static_cast<int>(rank));
  return HCCL_SUCCESS;
}

EMU_EXPORT HcclResult HcclGetCommName(HcclComm comm, char* commName) {
  if (comm == nullptr || commName == nullptr) return 1;
  const std::string& name = static_cast<Comm*>(comm)->group->name;
  std::strncpy(commName, name.c_str(), HCCL_COMM_NAME_MAX);
  commName[HCCL_COMM_NAME_MAX - 1] = '\0';
  return HCCL_SUCCESS;
}

EMU_EXPORT HcclResult HcclCommDestroy(HcclComm comm) {
  if (comm == nullptr) return 1;
  auto* c = static_cast<Comm*>(comm);
  {
    std::lock_guard<std::mutex> lock(c->group->mu);
    c->group->hub_ranks.erase(c->rank);  // closes the rank's connection to the hub
  }
  delete c;
  return HCCL_SUCCESS;
}

namespace {

// ---- tensor predicates, as opbase / ops-transformer define them

// MC2Aclnn::IsTensorContiguous: every stride is the product of the later view dims (strict:
// no exception for size-1 dims).
bool StrictContiguous(const aclTensor& t) {
  if (t.view.empty()) return false;
  int64_t expect = 1;
  for (int i = static_cast<int>(t.view.size()) - 1; i >= 0; --i) {
    if (t.strides[i] != expect) return false;
    expect *= t.view[i];
  }
  return true;
}

// op::IsContiguous (opbase): size-1 dims are skipped; 0 or 1 elements count as contiguous.
bool LenientContiguous(const aclTensor& t) {
  int64_t n = Numel(t.view);
  if (n <= 1) return true;
  int64_t expect = 1;
  for (int i = static_cast<int>(t.view.size()) - 1; i >= 0; --i) {
    if (t.view[i] == 1) continue;
    if (t.strides[i] != expect) return false;
    expect *= t.view[i];
  }
  return true;
}

// IsTransposeLastTwoDims: strides (..., 1, shape[-2]) and not a (1, 1) matrix. This is also
// how a transposed x2 is recognized: a (k, n) view with strides (1, k).
bool TransposeLastTwo(const aclTensor& t) {
  size_t r = t.view.size();
  if (r < 2 || r > 6) return false;
  if (t.strides[r - 2] != 1 || t.strides[r - 1] != t.view[r - 2]) return false;
  return !(t.view[r - 1] == 1 && t.view[r - 2] == 1);
}

bool Transposed(const aclTensor& x2) { return TransposeLastTwo(x2); }

// MatmulAllReduceIsWeightNZFormat: NZ view format with a 4-D storage.
bool IsNz(const aclTensor& t) { return t.format == ACL_FORMAT_FRACTAL_NZ && t.storage.size() == 4; }

// IsAffineInconsistent: a 2-D scale/offset with both dims > 1 must be transposed with x2.
bool AffineInconsistent(const aclTensor* t, bool transpose_x2) {
  if (t == nullptr || t->view.size() != 2 || t->view[0] == 1 || t->view[1] == 1) return false;
  bool contiguous = LenientContiguous(*t);
  return (transpose_x2 && contiguous) || (!transpose_x2 && !contiguous);
}

const char* DtypeName(aclDataType t) {
  switch (t) {
    case ACL_FLOAT: return "FLOAT";
    case ACL_FLOAT16: return "FLOAT16";
    case ACL_BF16: return "BFLOAT16";
    case ACL_INT8: return "INT8";
    case ACL_INT4: return "INT4";
    case ACL_UINT8: return "UINT8";
    case ACL_HIFLOAT8: return "HIFLOAT8";
    case ACL_FLOAT8_E5M2: return "FLOAT8_E5M2";
    case ACL_FLOAT8_E4M3FN: return "FLOAT8_E4M3FN";
    default: return "other";
  }
}

// op_api CheckParams (first stage): 161001 / 161002.
aclnnStatus CheckParams(Product product, const aclTensor* x1, const aclTensor* x2,
                        const aclTensor* bias, const aclTensor* scale, const aclTensor* offset,
                        const aclTensor* x3, const char* reduceOp, int64_t streamMode, int64_t gs,
                        const aclTensor* out) {
  const std::pair<const aclTensor*, const char*> required[] = {
      {x1, "x1"}, {x2, "x2"}, {scale, "antiquantScale"}, {out, "output"}};
  for (auto& [t, name] : required) {
    if (t == nullptr) return Fail(ACLNN_ERR_PARAM_NULLPTR, std::string(name) + " is nullptr");
  }
  auto invalid = [](const std::string& msg) { return Fail(ACLNN_ERR_PARAM_INVALID, msg); };
  // CheckDtypeValid
  auto act_ok = [&](aclDataType t) {
    return product == Product::k310P ? t == ACL_FLOAT16 : IsAct(t);
  };
  const aclDataType wd = x2->dtype;
  bool w_ok = wd == ACL_INT8 || wd == ACL_INT4 ||
              (product == Product::kAscend950 && (wd == ACL_FLOAT8_E4M3FN || wd == ACL_HIFLOAT8));
  if (!act_ok(x1->dtype)) return invalid(std::string("x1 dtype ") + DtypeName(x1->dtype) + " is not supported");
  if (!w_ok) return invalid(std::string("x2 dtype ") + DtypeName(wd) + " is not supported on this SoC");
  if (!act_ok(scale->dtype)) return invalid("antiquantScale dtype is not supported");
  if (!act_ok(out->dtype)) return invalid("output dtype is not supported");
  if (scale->dtype != x1->dtype) return invalid("antiquantScale dtype must equal x1's");
  if (out->dtype != x1->dtype) return invalid("output dtype must equal x1's");
  if (bias && (!act_ok(bias->dtype) || bias->dtype != x1->dtype))
    return invalid(std::string("bias dtype ") + DtypeName(bias->dtype) + " must equal x1's");
  if (offset && (!act_ok(offset->dtype) || offset->dtype != scale->dtype))
    return invalid("antiquantOffset dtype must equal antiquantScale's");
  if (x3 && (!act_ok(x3->dtype) || x3->dtype != x1->dtype))
    return invalid(std::string("x3 dtype ") + DtypeName(x3->dtype) + " must equal x1's");
  // CheckAttr
  if (std::string(reduceOp) != "sum") return invalid("reduceOp must be sum");
  if (streamMode != 1) return invalid("streamMode must be 1 (ACL_STOP_ON_FAILURE)");
  if (x1->view.empty()) return invalid("x1 must be 2-D or 3-D");
  const int64_t k = x1->view.back();
  if (k != 0 && gs != 0 && (gs % 32 != 0 || gs < 32 || gs > k - 1))
    return invalid("antiquantGroupSize " + std::to_string(gs) + " must be a multiple of 32 in [32, k-1]");
  // CheckShape
  if (x1->view.size() < 2 || x1->view.size() > 3) return invalid("x1 must be 2-D or 3-D");
  if (!IsNz(*x2)) {
    if (x2->view.size() != 2) return invalid("x2 view must be 2-D");
    const int64_t n = x2->view[1];
    if (x2->view[0] != k) return invalid("x2 k " + std::to_string(x2->view[0]) + " != x1 k " + std::to_string(k));
    std::vector<int64_t> out_dims(x1->view.begin(), x1->view.end() - 1);
    out_dims.push_back(n);
    if (out->view != out_dims) return invalid("output shape " + Dims(out->view) + " != " + Dims(out_dims));
    if (Numel(out->view) == 0) return invalid("output is empty (only k may be 0)");
    if (bias && bias->view != std::vector<int64_t>{n}) return invalid("bias shape " + Dims(bias->view) + " != (n,)");
    if (x3 && x3->view != out->view) return invalid("x3 shape " + Dims(x3->view) + " != the output's");
    if (k != 0) {
      const auto& sd = scale->view;
      if (sd.empty() || sd.size() > 2) return invalid("antiquantScale must be 1-D or 2-D");
      bool scale_ok = gs ? (sd == std::vector<int64_t>{(k + gs - 1) / gs, n})
                         : (sd == std::vector<int64_t>{1} || sd == std::vector<int64_t>{n} ||
                            sd == std::vector<int64_t>{1, n});
      if (!scale_ok) return invalid("antiquantScale shape " + Dims(sd) + " is not allowed");
      if (offset && offset->view != sd) return invalid("antiquantOffset shape must equal antiquantScale's");
    }
  }
  // Atlas A2: x2, scale and offset contiguous or transposed in their last two dims.
  bool empty = x1->view[1] == 0 || x2->view[0] == 0 || (x2->view.size() > 1 && x2->view[1] == 0);
  if (product == Product::kAtlasA2 && !empty) {
    const std::pair<const aclTensor*, const char*> dense[] = {
        {x2, "x2"}, {scale, "antiquantScale"}, {offset, "antiquantOffset"}};
    for (auto& [t, name] : dense) {
      if (t && !IsNz(*t) && !StrictContiguous(*t) && !TransposeLastTwo(*t))
        return invalid(std::string(name) + " must be contiguous or transposed in its last two dims");
    }
  }
  // Atlas A2 and 950: a per-group scale / offset is transposed together with x2.
  if (product == Product::kAtlasA2 || product == Product::kAscend950) {
    bool tx2 = Transposed(*x2);
    if (AffineInconsistent(scale, tx2))
      return invalid(std::string("antiquantScale must be ") + (tx2 ? "transposed with x2 (strides (1, G))" : "contiguous"));
    if (AffineInconsistent(offset, tx2))
      return invalid(std::string("antiquantOffset must be ") + (tx2 ? "transposed with x2 (strides (1, G))" : "contiguous"));
  }
  return ACLNN_SUCCESS;
}

// The tiling of aclnnInnerMatmulAllReduce (reached from the first stage): 561002.
aclnnStatus CheckTiling(Product product, const aclTensor* x1, const aclTensor* x2,
                        const aclTensor* bias, const aclTensor* scale, const aclTensor* offset,
                        const aclTensor* x3, const Group* group, int64_t commTurn, int64_t gs,
                        const aclTensor* out) {
  auto tiling = [](const std::string& msg) { return Fail(ACLNN_ERR_INNER_TILING_ERROR, msg); };
  if (product != Product::kAtlasA2 && product != Product::kAscend950)
    return tiling("no weight-quant MatmulAllReduce tiling for this SoC");
  std::vector<int> worlds = product == Product::kAtlasA2 ? std::vector<int>{1, 2, 4, 8}
                                                         : std::vector<int>{1, 2, 4, 8, 16, 32, 64};
  if (std::find(worlds.begin(), worlds.end(), group->size) == worlds.end())
    return tiling("rank size " + std::to_string(group->size) + " is not supported on this SoC");
  if (commTurn != 0) return tiling("commTurn must be 0");
  const int64_t k = x1->view.back();
  const bool nz = x2->format == ACL_FORMAT_FRACTAL_NZ;
  if (x2->storage.size() != (nz ? 4u : 2u)) return tiling("x2 storage must be 4-D (NZ) or 2-D (ND)");
  const int64_t n = out->view.back();
  const int64_t m = Numel(out->view) / std::max<int64_t>(n, 1);
  if (m < 1 || m > 2147483647LL) return tiling("m must be in [1, 2^31-1]");
  if (k > 65535 || n < 1 || n > 65535) return tiling("k and n must be at most 65535 (n >= 1)");
  if (nz) {
    const aclDataType wd = x2->dtype;
    if (wd != ACL_INT8 && wd != ACL_INT4) return tiling("a FRACTAL_NZ x2 must be INT8 or INT4");
    const int64_t c0 = wd == ACL_INT4 ? 64 : 32;
    bool transposed = Transposed(*x2);
    int64_t rows = transposed ? n : k, cols = transposed ? k : n;
    std::vector<int64_t> want = {(cols + c0 - 1) / c0, (rows + 15) / 16, 16, c0};
    if (x2->storage != want) return tiling("FRACTAL_NZ x2 storage " + Dims(x2->storage) + " != " + Dims(want));
  }
  const std::pair<const aclTensor*, const char*> optional[] = {
      {x3, "x3"}, {bias, "bias"}, {scale, "antiquantScale"}, {offset, "antiquantOffset"}};
  for (auto& [t, name] : optional) {
    if (t && Numel(t->view) == 0) return tiling(std::string(name) + " is empty");
  }
  if (k == 0) return ACLNN_SUCCESS;
  const int64_t scale_numel = Numel(scale->view);
  enum { kTensor, kChannel, kGroup } kind;
  if (scale_numel == 1) {
    if (gs != 0) return tiling("a one-element antiquantScale needs antiquantGroupSize 0");
    kind = kTensor;
  } else if (gs > 0) {
    if (k < 33) return tiling("per-group needs k >= 33");
    kind = kGroup;
  } else {
    if (scale_numel != n) return tiling("a per-channel antiquantScale must have n elements");
    kind = kChannel;
  }
  if (nz && kind != kChannel) return tiling("a FRACTAL_NZ x2 needs a per-channel antiquantScale");
  if (product == Product::kAscend950) {
    const aclDataType wd = x2->dtype;
    if (wd == ACL_FLOAT8_E4M3FN || wd == ACL_HIFLOAT8) {
      if (offset) return tiling("FLOAT8_E4M3FN / HIFLOAT8 x2 takes no antiquantOffset");
      if (kind != kChannel) return tiling("FLOAT8_E4M3FN / HIFLOAT8 x2 needs a per-channel antiquantScale");
      if (nz) return tiling("FLOAT8_E4M3FN / HIFLOAT8 x2 must be ND");
    }
    const int64_t align = wd == ACL_INT4 ? 64 : 32;
    if (kind == kGroup && (wd == ACL_INT8 || wd == ACL_INT4) && (n % align || k % align))
      return tiling("per-group n and k must be multiples of " + std::to_string(align));
  }
  return ACLNN_SUCCESS;
}

// Index into x2's storage of logical element (i, j) of its (k, n) view.
int64_t WeightIndex(const aclTensor& x2, int64_t i, int64_t j) {
  if (x2.format == ACL_FORMAT_FRACTAL_NZ) {
    bool transposed = Transposed(x2);
    int64_t r = transposed ? j : i, c = transposed ? i : j;  // element of the stored matrix
    int64_t r1 = x2.storage[1], c0 = x2.storage[3];
    return ((c / c0) * r1 + r / 16) * 16 * c0 + (r % 16) * c0 + (c % c0);
  }
  return i * x2.strides[0] + j * x2.strides[1];
}

}  // namespace

EMU_EXPORT aclnnStatus aclnnWeightQuantMatmulAllReduceGetWorkspaceSize(
    const aclTensor* x1, const aclTensor* x2, const aclTensor* bias,
    const aclTensor* antiquantScale, const aclTensor* antiquantOffset, const aclTensor* x3,
    const char* group, const char* reduceOp, int64_t commTurn, int64_t streamMode,
    int64_t antiquantGroupSize, const aclTensor* output, uint64_t* workspaceSize,
    aclOpExecutor** executor) {
  if (g_fail_stage.load() == 1) return Fail(g_fail_code.load(), "injected failure (emulator)");
  if (workspaceSize == nullptr || executor == nullptr)
    return Fail(ACLNN_ERR_PARAM_NULLPTR, "workspaceSize or executor is nullptr");
  const Product product = CurrentProduct();
  aclnnStatus st = CheckParams(product, x1, x2, bias, antiquantScale, antiquantOffset, x3,
                               reduceOp, streamMode, antiquantGroupSize, output);
  if (st != ACLNN_SUCCESS) return st;
  // HCCL resolves the group name on the calling thread's current device.
  auto g = group ? FindGroup(group) : nullptr;
  bool member = false;
  if (g) {
    std::lock_guard<std::mutex> lock(g->mu);
    member = g->device_to_rank.count(t_device) > 0;
  }
  if (!member) {
    return Fail(ACLNN_ERR_INNER_TILING_ERROR,
                std::string("group '") + (group ? group : "(null)") + "' is not known on device " +
                    std::to_string(t_device) + " (the calling thread's current device)");
  }
  st = CheckTiling(product, x1, x2, bias, antiquantScale, antiquantOffset, x3, g.get(),
                   commTurn, antiquantGroupSize, output);
  if (st != ACLNN_SUCCESS) return st;
  auto* e = new aclOpExecutor;
  e->x1 = *x1;
  e->x2 = *x2;
  e->scale = *antiquantScale;
  e->out = *output;
  if ((e->has_bias = bias != nullptr)) e->bias = *bias;
  if ((e->has_offset = antiquantOffset != nullptr)) e->offset = *antiquantOffset;
  if ((e->has_x3 = x3 != nullptr)) e->x3 = *x3;
  e->group = group;
  e->group_size = antiquantGroupSize;
  e->workspace = 4096;  // exercised, not needed
  g_live_executors.fetch_add(1);
  *workspaceSize = e->workspace;
  *executor = e;
  return ACLNN_SUCCESS;
}

EMU_EXPORT aclnnStatus aclnnWeightQuantMatmulAllReduce(void* workspace, uint64_t workspaceSize,
                                                       aclOpExecutor* executor,
                                                       const aclrtStream stream) {
  (void)stream;
  if (executor == nullptr) return Fail(ACLNN_ERR_PARAM_NULLPTR, "executor is nullptr");
  std::unique_ptr<aclOpExecutor> e(executor);  // single use, freed on every path
  g_live_executors.fetch_sub(1);
  if (g_fail_stage.load() == 2) return Fail(g_fail_code.load(), "injected failure (emulator)");
  if (workspaceSize < e->workspace || (e->workspace && workspace == nullptr))
    return Fail(ACLNN_ERR_PARAM_INVALID, "workspace smaller than requested");
  std::memset(workspace, 0xAB, workspaceSize);  // the workspace is really written
  auto group = FindGroup(e->group);
  if (!group) return Fail(ACLNN_ERR_PARAM_INVALID, "group '" + e->group + "' vanished");
  int rank;
  {
    std::lock_guard<std::mutex> lock(group->mu);
    auto it = group->device_to_rank.find(t_device);
    if (it == group->device_to_rank.end()) {
      return Fail(ACLNN_ERR_PARAM_INVALID, "device " + std::to_string(t_device) +
                                               " is not a member of group " + e->group);
    }
    rank = it->second;
  }
  g_calls.fetch_add(1);
  const aclTensor &x1 = e->x1, &x2 = e->x2, &sc = e->scale;
  const int64_t k = x1.view.back(), n = e->out.view.back(), m = Numel(e->out.view) / n;
  const int64_t gs = e->group_size;
  const bool per_tensor = Numel(sc.view) == 1;
  // Scale / offset element of weight (i, j), through the descriptor's strides.
  auto qparam = [&](int64_t i, int64_t j) -> int64_t {
    if (per_tensor) return 0;
    if (gs) return (i / gs) * sc.strides[0] + j * sc.strides[1];
    return j * sc.strides.back();
  };
  // The kernel's rounding (numerics.h): W dequantized in the activation dtype, float32
  // accumulation (here in double, then one float32 rounding: a sum order of its own), bias in
  // the accumulator, one rounding to the output dtype, then x3 added and rounded again.
  const bool f16 = x1.dtype == ACL_FLOAT16;
  std::vector<float> w(static_cast<size_t>(k * n));
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      int64_t p = qparam(i, j);
      float q = ReadWeight(&x2, WeightIndex(x2, i, j));
      w[i * n + j] = jax_wqmm::Dequant(f16, q, e->has_offset ? ReadFloat(&e->offset, p) : 0.0f, ReadFloat(&sc, p));
    }
  }
  std::vector<float> y(static_cast<size_t>(m * n));
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t j = 0; j < n; ++j) {
      double acc = 0;
      for (int64_t i = 0; i < k; ++i) acc += double(ReadFloat(&x1, r * k + i)) * w[i * n + j];
      y[r * n + j] = jax_wqmm::OutputElement(
          f16, static_cast<float>(acc), e->has_bias, e->has_bias ? ReadFloat(&e->bias, j) : 0.0f,
          e->has_x3, e->has_x3 ? ReadFloat(&e->x3, r * n + j) : 0.0f);
    }
  }
  aclnnStatus st = AllReduce(*group, rank, e->out.dtype, &y);
  if (st != ACLNN_SUCCESS) return st;
  for (int64_t i = 0; i < m * n; ++i) WriteFloat(&e->out, i, y[i]);
  return ACLNN_SUCCESS;
}

// ------------------------------------------------------------------ test hooks

EMU_EXPORT int64_t wqmm_emu_live_tensors() { return g_live_tensors.load(); }
EMU_EXPORT int64_t wqmm_emu_live_executors() { return g_live_executors.load(); }
// Communicators created and not destroyed (HcclCommInitAll / HcclCommInitRootInfo).
EMU_EXPORT int64_t wqmm_emu_live_comms() { return g_live_comms.load(); }
// stage 1: GetWorkspaceSize, 2: the op; 0 clears. Every call fails with ``code`` while set.
EMU_EXPORT void wqmm_emu_set_failure(int stage, int code) {
  g_fail_code.store(code);
  g_fail_stage.store(stage);
}
EMU_EXPORT void wqmm_emu_set_timeout_ms(int64_t ms) { g_timeout_ms.store(ms); }
// Operator runs so far (second stage calls that reached the computation).
EMU_EXPORT int64_t wqmm_emu_calls() { return g_calls.load(); }
// The emulated SoC: "Ascend910B4" (Atlas A2, the default), "Ascend950PR", "Ascend910_9391"
// (Atlas A3), "Ascend310P3", ...
EMU_EXPORT void wqmm_emu_set_soc(const char* soc) {
  std::lock_guard<std::mutex> lock(g_soc_mu);
  g_soc = soc ? soc : "";
}
EMU_EXPORT int64_t wqmm_emu_timeout_ms() { return g_timeout_ms.load(); }
