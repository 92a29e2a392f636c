// Run-time loading of the CANN libraries (dlopen), the symbol table the handler calls, and the
// report of what was tried when something is missing.
#ifndef JAX_WQMM_CANN_LIBRARY_H_
#define JAX_WQMM_CANN_LIBRARY_H_

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cann_abi.h"

namespace jax_wqmm {

// Every entry point the project calls. Optional ones may be null after a successful load.
struct CannApi {
  // libnnopbase
  aclCreateTensor_t aclCreateTensor = nullptr;
  aclDestroyTensor_t aclDestroyTensor = nullptr;
  // op library (libopapi_transformer.so, else libopapi.so)
  aclnnWeightQuantMatmulAllReduceGetWorkspaceSize_t GetWorkspaceSize = nullptr;
  aclnnWeightQuantMatmulAllReduce_t Run = nullptr;
  // libascendcl
  aclrtGetDevice_t aclrtGetDevice = nullptr;
  aclrtSetDevice_t aclrtSetDevice = nullptr;
  aclGetRecentErrMsg_t aclGetRecentErrMsg = nullptr;  // optional
  aclrtGetSocName_t aclrtGetSocName = nullptr;        // optional
  // libhccl (or libhcomm on CANN >= 8.5)
  HcclGetCommName_t HcclGetCommName = nullptr;
  HcclCommInitAll_t HcclCommInitAll = nullptr;
  HcclGetRootInfo_t HcclGetRootInfo = nullptr;
  HcclCommInitRootInfo_t HcclCommInitRootInfo = nullptr;
  HcclCommDestroy_t HcclCommDestroy = nullptr;

  // The library's own text for its most recent error, or "" if unavailable.
  std::string RecentErrorMessage() const;
  // Makes ``device`` (a logical device id in this process) current on the calling thread
  // unless it already is (aclrtGetDevice / aclrtSetDevice). Returns "" or an error text.
  std::string EnsureDevice(int32_t device) const;
};

// Library roles, in load order (dependencies first).
inline const std::vector<std::string>& LibraryRoles() {
  static const std::vector<std::string> roles = {"ascendcl", "nnopbase", "hccl", "opapi"};
  return roles;
}

// One successful load: the symbol table and the library handles it came from. Immutable once
// published; the handles are closed when the last user (a running handler) lets go.
struct LoadedCann {
  CannApi api;
  std::vector<void*> handles;
  std::map<std::string, std::string> paths;         // role -> paths loaded (", "-joined)
  std::map<std::string, std::string> symbol_paths;  // symbol -> the file it came from
  ~LoadedCann();
};

class CannLibrary {
 public:
  static CannLibrary& Get();

  // (Re)loads every library. ``names[role]`` lists candidate file names (or paths, if they
  // contain '/'), each tried in each of ``dirs`` and then on the loader's default path:
  //  - "opapi": directory by directory, every candidate in order; the first file that
  //    exports both aclnn entry points wins;
  //  - other roles: every candidate that is found is loaded, and each symbol is taken from
  //    the first of them (in candidate order) that exports it.
  // Returns "" on success, else a report of every path tried and every symbol missing.
  // A handler still running with the previous load keeps it alive until it returns.
  std::string Load(const std::vector<std::string>& dirs,
                   const std::map<std::string, std::vector<std::string>>& names);
  void Unload();

  // The current load, or null if nothing is loaded. Hold it for the whole call.
  std::shared_ptr<const LoadedCann> Current() const;
  // The last failure report ("" after a successful load or before any attempt).
  std::string report() const;

 private:
  mutable std::mutex mu_;
  std::shared_ptr<const LoadedCann> current_;
  std::string report_;
};

}  // namespace jax_wqmm

#endif  // JAX_WQMM_CANN_LIBRARY_H_
