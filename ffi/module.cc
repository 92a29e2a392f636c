// The nanobind module jax_wqmm._wqmm_ffi: handler capsules, the CANN loader, the HCCL calls
// that jax_wqmm.hccl needs, and the group registry.
#include <nanobind/nanobind.h>
#include <nanobind/stl/map.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cann_library.h"
#include "cpu_handler.h"
#include "cpu_kernel.h"
#include "wqmm_handler.h"

namespace nb = nanobind;
using jax_wqmm::CannApi;
using jax_wqmm::CannLibrary;

namespace {

template <typename T>
nb::capsule EncapsulateFfiHandler(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "Encapsulated function must be an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

// The current load, kept alive by a static copy for the module's HCCL calls (their
// communicators belong to it).
const CannApi& RequireApi() {
  static std::shared_ptr<const jax_wqmm::LoadedCann> keep;
  auto lib = CannLibrary::Get().Current();
  if (lib == nullptr) {
    throw std::runtime_error("the CANN libraries are not loaded:\n" + CannLibrary::Get().report());
  }
  keep = lib;
  return lib->api;
}

void CheckHccl(const CannApi& api, int result, const char* call) {
  if (result != HCCL_SUCCESS) {
    std::string detail = api.RecentErrorMessage();
    throw std::runtime_error(std::string(call) + " returned " + std::to_string(result) +
                             (detail.empty() ? "" : ": " + detail));
  }
}

std::string CommName(const CannApi& api, HcclComm comm) {
  char name[HCCL_COMM_NAME_MAX + 1] = {0};
  CheckHccl(api, api.HcclGetCommName(comm, name), "HcclGetCommName");
  return std::string(name);
}

}  // namespace

NB_MODULE(_wqmm_ffi, m) {
  m.doc() = "XLA FFI handlers for aclnnWeightQuantMatmulAllReduce and the CANN loader.";

  m.def("registrations", []() {
    nb::dict d;
    d["wqmm_aclnn_device"] = EncapsulateFfiHandler(WqmmAclnnDevice);
    d["wqmm_aclnn_host"] = EncapsulateFfiHandler(WqmmAclnnHost);
    d["wqmm_noop"] = EncapsulateFfiHandler(WqmmNoop);
    d["wqmm_cpu_matmul"] = EncapsulateFfiHandler(WqmmCpuMatmul);
    d["wqmm_cpu_dequantize"] = EncapsulateFfiHandler(WqmmCpuDequantize);
    return d;
  });

  m.def("cpu_matmul_blocked", [](bool bf16, bool transposed, bool int4, int64_t n) {
    return jax_wqmm::cpu::MatmulBlocked(bf16 ? jax_wqmm::cpu::Float::kBF16 : jax_wqmm::cpu::Float::kF16,
                                        transposed, int4, n);
  }, nb::arg("bf16"), nb::arg("transposed"), nb::arg("int4"), nb::arg("n"),
        "Whether the CPU kernel runs such a call with its blocked bf16 kernel at large m, here.");
  m.def("cpu_isa", &jax_wqmm::cpu::Isa,
        "The instruction set the CPU kernels dispatch to: avx512bf16, avx512, avx2 or portable.");
  m.def("cpu_peak_mac_rate", &jax_wqmm::cpu::PeakMacRate, nb::arg("seconds") = 0.2,
        nb::arg("float_fma") = false, nb::call_guard<nb::gil_scoped_release>(),
        "Multiply-adds per second of all cores on the kernels' widest instruction, or on float "
        "FMAs (0: unknown).");
  m.def("cpu_convert_rate", &jax_wqmm::cpu::ConvertRate, nb::arg("int4"), nb::arg("rows") = 0,
        nb::arg("seconds") = 0.2, nb::call_guard<nb::gil_scoped_release>(),
        "Weights per second the bf16 decode kernel converts to rounded bf16 (and multiplies with "
        "`rows` rows of x), codes in L1 (0: not run).");

  // ------------------------------------------------------------------ loader
  m.def("load_cann", [](const std::vector<std::string>& dirs,
                        const std::map<std::string, std::vector<std::string>>& names) {
    return CannLibrary::Get().Load(dirs, names);
  }, nb::arg("dirs"), nb::arg("names"),
     "Loads the CANN libraries (candidate file names per role); returns '' or a report of "
     "every path and symbol that failed.");
  m.def("unload_cann", []() { CannLibrary::Get().Unload(); });
  m.def("cann_loaded", []() { return CannLibrary::Get().Current() != nullptr; });
  m.def("cann_paths", []() {
    auto lib = CannLibrary::Get().Current();
    return lib ? lib->paths : std::map<std::string, std::string>();
  });
  m.def("cann_symbols", []() {
    auto lib = CannLibrary::Get().Current();
    return lib ? lib->symbol_paths : std::map<std::string, std::string>();
  }, "{symbol: the file it was taken from}.");
  m.def("soc_name", []() {
    const CannApi& api = RequireApi();
    const char* name = api.aclrtGetSocName ? api.aclrtGetSocName() : nullptr;
    return std::string(name ? name : "");
  }, "aclrtGetSocName(), or '' when CANN does not say.");
  m.def("bind_device", [](int32_t device) {
    const CannApi& api = RequireApi();
    std::string e = api.EnsureDevice(device);
    if (!e.empty()) throw std::runtime_error(e);
    int32_t current = -1;
    int r = api.aclrtGetDevice(&current);
    if (r != 0) throw std::runtime_error("aclrtGetDevice returned " + std::to_string(r));
    return current;
  }, nb::arg("device"),
     "Makes ``device`` current on the calling thread as the handler does; returns "
     "aclrtGetDevice() afterwards.");

  // ------------------------------------------------------------------ group registry
  m.def("register_group", &jax_wqmm::RegisterGroup, nb::arg("axis"), nb::arg("device"),
        nb::arg("name"));
  m.def("clear_groups", &jax_wqmm::ClearGroups);
  m.def("groups", []() {
    nb::dict d;
    for (const auto& [key, name] : jax_wqmm::Groups()) d[nb::make_tuple(key.first, key.second)] = name;
    return d;
  });

  // ------------------------------------------------------------------ HCCL / ACL calls
  m.def("hccl_comm_init_all", [](std::vector<int32_t> devices) {
    const CannApi& api = RequireApi();
    std::vector<HcclComm> comms(devices.size(), nullptr);
    {
      nb::gil_scoped_release release;
      CheckHccl(api, api.HcclCommInitAll(static_cast<uint32_t>(devices.size()), devices.data(),
                                    comms.data()),
                "HcclCommInitAll");
    }
    std::vector<std::pair<uintptr_t, std::string>> out;
    for (HcclComm c : comms) out.emplace_back(reinterpret_cast<uintptr_t>(c), CommName(api, c));
    return out;
  }, "One communicator per device of one group, in one process: [(handle, name)].");
  m.def("hccl_get_root_info", [](int32_t device) {
    const CannApi& api = RequireApi();
    HcclRootInfo info;
    {
      nb::gil_scoped_release release;
      std::string e = api.EnsureDevice(device);  // HCCL works on the thread's current device
      if (!e.empty()) throw std::runtime_error(e);
      CheckHccl(api, api.HcclGetRootInfo(&info), "HcclGetRootInfo");
    }
    return nb::bytes(info.internal, sizeof(info.internal));
  });
  m.def("hccl_comm_init_root_info", [](int32_t device, uint32_t nranks, nb::bytes root,
                                        uint32_t rank) {
    const CannApi& api = RequireApi();
    if (root.size() != sizeof(HcclRootInfo)) throw std::invalid_argument("root info: wrong size");
    HcclRootInfo info;
    std::memcpy(info.internal, root.c_str(), sizeof(info.internal));
    HcclComm comm = nullptr;
    {
      nb::gil_scoped_release release;  // blocks until every rank has joined
      // HCCL binds the communicator to the calling thread's current device.
      std::string e = api.EnsureDevice(device);
      if (!e.empty()) throw std::runtime_error(e);
      CheckHccl(api, api.HcclCommInitRootInfo(nranks, &info, rank, &comm), "HcclCommInitRootInfo");
    }
    return std::make_pair(reinterpret_cast<uintptr_t>(comm), CommName(api, comm));
  });
  m.def("hccl_comm_destroy", [](uintptr_t handle) {
    const CannApi& api = RequireApi();
    CheckHccl(api, api.HcclCommDestroy(reinterpret_cast<HcclComm>(handle)), "HcclCommDestroy");
  });
}
